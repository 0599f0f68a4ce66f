"""Interoperability: Hugging Face checkpoints both ways, ONNX export, int8 quantization, HTTP serving.

Imports `tessera.core` only; the optional dependencies (onnx, onnxruntime, fastapi, uvicorn)
are imported by the module that needs them, so converting checkpoints needs none of them.
"""
