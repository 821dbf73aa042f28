"""Backend builds of a package: ORT-optimized graphs and TensorRT engines, recorded in the engine table."""
