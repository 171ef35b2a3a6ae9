"""Merge LoRA adapters into the base weights and save a plain Hugging Face model folder."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from fastft.atomic_files import replace_dir


def save_merged(model, tokenizer, out: Path) -> None:
    """Write ``W + scale * B @ A`` for every adapter as an HF folder that
    ``AutoModelForCausalLM.from_pretrained`` loads. Consumes the adapters: call at the end."""
    out = Path(out)
    tmp = Path(tempfile.mkdtemp(prefix=".merged.", dir=out.parent))
    try:
        from fastft.models.lora import merge_lora

        merged = merge_lora(model) or model
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
