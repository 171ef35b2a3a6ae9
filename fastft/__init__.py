"""fastft: a performance-first fine-tuning trainer for Hugging Face language models.

Public entry points are imported lazily so ``import fastft`` (and the CLI) stay fast.
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "patch_model": "fastft.models.hf_patch",
    "unpatch_model": "fastft.models.hf_patch",
    "FusedAdamW": "fastft.optim",
    "inject_lora": "fastft.models.lora",
    "quantize_model_int8": "fastft.models.lora",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastft' has no attribute {name!r}")
