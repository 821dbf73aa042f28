"""Training recipes: the trainer, losses and one recipe per trainable family (stages, data in)."""
