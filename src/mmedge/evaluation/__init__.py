"""Task metrics of a pipeline on --data: retrieval recall, VQA accuracy and caption match (torch-free)."""

from mmedge.evaluation.tasks import evaluate, evaluate_chat, evaluate_items, evaluate_zero_shot

__all__ = ["evaluate", "evaluate_chat", "evaluate_items", "evaluate_zero_shot"]
