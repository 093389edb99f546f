"""ONNX generator harness: KV-cache token generation on onnxruntime.

``Generator.from_pretrained(folder)`` loads a decoder exported by
``ftattn.onnx.export`` (optimum layout) or by onnxruntime-genai's model builder
(GroupQueryAttention layout) with its ``tokenizer.json``; ``generate`` runs
greedy search or sampling over a batch of prompts. Needs the ``onnx`` extra
(``pip install 'ftattn[onnx]'``); ``python -m ftattn generate`` is the command,
``python -m ftattn.onnx HF_DIR OUT_DIR`` exports.
"""
from .generator import Generation, Generator  # noqa: F401
from .model import ModelSpec, Padding  # noqa: F401
from .sampling import SamplingConfig  # noqa: F401
from .exporter import export  # noqa: F401

__all__ = ["Generator", "Generation", "ModelSpec", "Padding", "SamplingConfig", "export"]
