"""Load a causal LM straight into int8 base weights (``lora.int8_base``), never holding the
full-precision model.

Loading the bf16 model and quantising it afterwards held, for SmolLM2-135M, 781 MB RSS after
quantising against 493 MB for the bf16 model alone: the whole safetensors file stayed mapped (the
embedding still pointed into it, so every page the quantiser read stayed resident) and the fp32
temporaries of each layer fragmented the heap. Here the model is built on the ``meta`` device,
each linear weight is read from the file with plain reads (no mmap) into one buffer, quantised
and dropped, and only the other tensors (embeddings, norms, the output head) are materialised.
Peak memory is the int8 model plus one layer's temporaries.

The int8 weights are exactly those of ``quantize_model_int8`` applied to the model loaded in the
run dtype (the weight is cast to that dtype before quantising), so both paths train identically.
Architectures this cannot rebuild (a non-persistent buffer it cannot re-create, a tensor the file
lacks) fall back to load-then-quantise, said once.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from torch import nn

from fastft.runtime import release_free_heap as _malloc_trim

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class SafetensorsReader:
    """Tensors of a model folder's ``*.safetensors`` files, read with ``readinto`` (no mmap: a
    mapped file's touched pages count in RSS until every tensor from it is gone)."""

    def __init__(self, folder: str | Path):
        self.index: dict[str, tuple[Path, dict, int]] = {}
        for f in sorted(Path(folder).glob("*.safetensors")):
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            for name, meta in header.items():
                if name != "__metadata__":
                    self.index[name] = (f, meta, 8 + n)

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def get(self, name: str) -> torch.Tensor:
        f, meta, base = self.index[name]
        start, end = meta["data_offsets"]
        t = torch.empty(meta["shape"], dtype=_DTYPES[meta["dtype"]])
        buf = t.view(-1).view(torch.uint8) if t.numel() else bytearray(0)
        with open(f, "rb") as fh:
            fh.seek(base + start)
            if end > start:
                fh.readinto(memoryview(buf.numpy()) if isinstance(buf, torch.Tensor) else buf)
        return t


def _quantized_names(model: nn.Module, skip) -> list[str]:
    """The ``nn.Linear`` modules ``quantize_model_int8`` would replace (same rule)."""
    from fastft.models.lora import _excluded_heads, _match

    heads = _excluded_heads(model)
    return [n for n, m in model.named_modules() if type(m) is nn.Linear and n not in heads and not _match(n, skip)]


def _rebuild_meta_buffers(model: nn.Module) -> bool:
    """Re-create modules whose non-persistent buffers (e.g. rotary ``inv_freq``) are still on
    ``meta`` from ``model.config``, as their ``__init__`` computes them. False when one cannot be."""
    from fastft.models.lora import _set_module

    for name, mod in list(model.named_modules()):
        if any(b.is_meta for b in mod.buffers(recurse=False)):
            if any(p.is_meta for p in mod.parameters(recurse=False)):
                return False
            try:
                new = type(mod)(config=model.config)
            except TypeError:
                return False
            if any(b.is_meta for b in new.buffers()):
                return False
            _set_module(model, name, new)
    return True


def load_int8_causal_lm(folder: str, config, dtype: torch.dtype, attn_implementation: str | None = None,
                        skip=("lm_head",)) -> nn.Module | None:
    """The causal LM of ``folder`` with every base linear (``quantize_model_int8``'s rule) as an
    ``Int8Linear``, built without a full-precision copy. None when this architecture cannot be
    streamed (the caller loads and quantises instead)."""
    from transformers import AutoModelForCausalLM

    from fastft.models.lora import Int8Linear, _set_module
    from fastft.ops.lora_linear import quantize_int8

    reader = SafetensorsReader(folder)
    if not reader.index:
        return None
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    prefixes = ["", getattr(model, "base_model_prefix", "") + "."]

    def find(name: str) -> str | None:  # checkpoints saved from the base model lack its prefix
        for p in prefixes:
            k = name[len(p):] if p and name.startswith(p) else name
            if k in reader:
                return k
        return name if name in reader else None

    quantized = _quantized_names(model, skip)
    for name in quantized:
        lin = model.get_submodule(name)
        key = find(f"{name}.weight")
        if key is None:
            return None
        w = reader.get(key).to(dtype)  # as load-then-quantise sees it: identical int8 weights
        bias = None
        if lin.bias is not None:
            bkey = find(f"{name}.bias")
            if bkey is None:
                return None
            bias = reader.get(bkey).to(dtype)
        q = Int8Linear(quantize_int8(w), bias, dtype)
        del w
        _set_module(model, name, q)
        # the layer's fp32 temporaries were freed into the heap; unreturned, they piled up by
        # ~2.3 MB per layer in some runs (HWM 945 vs 648 MB for SmolLM2, glibc's dynamic mmap threshold)
        _malloc_trim()
    rest = {}
    tied = {id(model.get_output_embeddings().weight)} if getattr(config, "tie_word_embeddings", False) else set()
    for name, t in list(model.state_dict(keep_vars=True).items()):
        if not t.is_meta:
            continue
        key = find(name)
        if key is None:
            if id(t) in tied:
                continue  # the tied head: tie_weights() below
            return None
        v = reader.get(key)
        rest[name] = v.to(dtype) if v.is_floating_point() and t.is_floating_point() else v.to(t.dtype)
    model.load_state_dict(rest, strict=False, assign=True)
    del rest
    if tied:
        model.tie_weights()
    if any(p.is_meta for p in model.parameters()) or not _rebuild_meta_buffers(model):
        return None
    model.config._name_or_path = str(folder)
    _malloc_trim()
    return model.eval()
