"""rembg-fleet inference server: FastAPI + onnxruntime background removal."""

__version__ = "0.1.0"
