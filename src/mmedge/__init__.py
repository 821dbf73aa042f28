"""mmedge: export, quantize and run multimodal models on edge devices.

Importing this package does no work and pulls in neither torch nor onnxruntime; the
public facade is ``from mmedge import sdk``.
"""

__version__ = "0.1.0"
