"""Run Hugging Face Llama-family blocks on fastft's fused RMSNorm, SwiGLU and rotary kernels.

``patch_blocks(model)`` rewires, per module instance (other models in the process are not
touched):

* every ``<Arch>RMSNorm``  -> :func:`fastft.ops.rms_norm.rms_norm` (same maths, HF's rounding);
* every ``<Arch>MLP`` with a SiLU activation -> ``down(swiglu(gate(x), up(x)))``;
* every ``<Arch>Attention`` -> :func:`fastft.ops.rope.rope` in place of the modeling module's
  ``apply_rotary_pos_emb``. The attention code calls that module-level function by name, so
  the module global is replaced by a dispatcher that runs the fused op only inside a patched
  attention module's forward (a context variable set by the patched forward, so activation
  checkpointing's recompute takes the same path) and the original everywhere else;
* with ``attention=True`` (the default), HF's ``sdpa`` attention function, inside a patched
  attention module's forward, runs :func:`fastft.ops.attention.causal_attention` when the call is
  plain causal self-attention (no mask tensor, no dropout, no cache, no softcap/sinks/bias; packed
  rows inside :func:`packed_segments`, below) and HF's SDPA otherwise (other masks, generation
  with a cache).

Packed rows (several samples per row, or a pad tail) stay on this path: inside
:func:`packed_segments` (fastft's training loss enters it when :func:`routes_attention` holds),
the modeling module's ``create_causal_mask`` returns None instead of building a (B, 1, T, T) mask,
and every attention call of a patched module (fused layer or per-op) reads the rows' sample layout
(:class:`fastft.ops.segments.Segments`) from the context instead. RoPE takes the per-sample
position ids as HF gives them. A call that cannot take the segments (dropout, extra kwargs) gets
the equivalent boolean mask built from them and HF's SDPA (counted, warned once), never a
leak. :func:`fallbacks` counts the calls that left the fused paths.

Supported ``config.model_type``: llama, mistral, qwen2, qwen3 (checked against transformers
5.23's module and class names). Anything else is left unpatched (:func:`supported` says so).
The projections are looked up at call time, so LoRA/PEFT wrappers applied afterwards still work.
``unpatch_blocks(model)`` restores the original forwards.

Inside :class:`fastft.models.recompute.recompute_cheap` (fastft's training loss enters it when
``model.recompute_cheap`` is on) the fused RMSNorm and SwiGLU outputs are registered, so the
projections' saved copies of them are rebuilt in backward instead of kept.
"""
from __future__ import annotations

import contextvars
import importlib
import types
import warnings
import weakref

import torch
from torch import nn

from fastft.models import recompute
from fastft.models.fused_layer import fused_layer_forward, layer_plan
from fastft.ops.attention import causal_attention, packed_rows_supported
from fastft.ops.rms_norm import rms_norm, rms_norm_node_backend
from fastft.ops.rope import rope
from fastft.ops.segments import Segments
from fastft.ops.swiglu import swiglu, swiglu_node_backend

__all__ = ["SUPPORTED_MODEL_TYPES", "fallbacks", "packed_segments", "patch_blocks", "routes_attention", "supported",
           "unpatch_blocks"]

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_ROPE_ON = contextvars.ContextVar("fastft_fused_rope", default=False)
_ORIGINAL_ROPE: dict[str, object] = {}   # modeling module name -> its apply_rotary_pos_emb
_ORIGINAL_MASK: dict[str, object] = {}   # modeling module name -> its create_causal_mask
# the sample layout of the rows being run (packed_segments); None = plain causal rows
_SEGMENTS: contextvars.ContextVar[Segments | None] = contextvars.ContextVar("fastft_segments", default=None)
# modeling module name -> its live patched attention modules (weak: a patched model that is simply
# dropped must not pin the dispatcher forever)
_PATCHED_ATTN: dict[str, weakref.WeakSet] = {}
_ATTN_ON = contextvars.ContextVar("fastft_fused_attention", default=False)
_SDPA_SAVED: dict[str, object] = {}  # "previous" -> the interface's own local "sdpa" entry, if any
# HF attention kwargs that change the maths; any of them (non-None) sends the call to HF's SDPA.
# (``sliding_window`` is not one: HF's SDPA path ignores it, the window lives in the mask, and a
# None mask means the window covers the sequence.)
_ATTN_EXTRAS = ("softcap", "position_bias", "cache", "s_aux", "sinks")
_WARNED: set[str] = set()


class packed_segments:
    """Context manager: the model calls inside run packed rows described by ``segments``
    ((B, T) sample starts/ends, :mod:`fastft.ops.segments`) with no attention mask. Only for a
    model where :func:`routes_attention` is True (else its attention would not see them)."""

    def __init__(self, segments: Segments | None):
        self.segments = segments

    def __enter__(self):
        self._token = _SEGMENTS.set(self.segments)
        return self.segments

    def __exit__(self, *exc):
        _SEGMENTS.reset(self._token)
        return False


def routes_attention(model: nn.Module) -> bool:
    """True when every attention module of ``model``'s decoder runs through fastft's SDPA
    dispatcher (patched with ``attention=True``, ``attn_implementation="sdpa"``), so packed rows
    can go without a mask (:func:`packed_segments`)."""
    cfg = getattr(model, "config", None)
    if _model_type(model) not in SUPPORTED_MODEL_TYPES or getattr(cfg, "_attn_implementation", None) != "sdpa":
        return False
    attn_cls = getattr(_modeling(_model_type(model)), _PREFIX[_model_type(model)] + "Attention")
    mods = [m for m in model.modules() if type(m) is attn_cls]
    # activation checkpointing recomputes layers in backward, outside packed_segments: those
    # recomputed attention calls would not see the segments, so such models take the mask path
    if any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
        return False
    p = next(model.parameters(), None)
    if p is not None and not packed_rows_supported(p.device):  # an extension built before packed rows
        return False
    return bool(mods) and all(getattr(m, "_fastft_attention", False) for m in mods)


def fallbacks(model: nn.Module) -> dict[str, int]:
    """Calls that left fastft's fused paths since patching: ``layer`` (decoder layers that ran
    HF's per-op forward), ``attention`` (attention calls sent to HF's SDPA, with a mask)."""
    out = {"layer": 0, "attention": 0}
    for m in model.modules():
        out["layer"] += m.__dict__.get("_fastft_layer_fallbacks", 0)
        out["attention"] += m.__dict__.get("_fastft_sdpa_fallbacks", 0)
    return out


def _segment_mask(seg: Segments, dtype_like: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool mask of the segments (True = attend): only for calls that cannot take them."""
    t = seg.shape[1]
    i = torch.arange(t, device=dtype_like.device)
    start = seg.start.to(dtype_like.device).long()
    return ((i[None, None, :] <= i[None, :, None]) & (i[None, None, :] >= start[:, :, None]))[:, None]


def _model_type(model: nn.Module) -> str | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "model_type", None)


_PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}


def supported(model: nn.Module) -> bool:
    """True when ``model`` (a HF PreTrainedModel, possibly PEFT-wrapped) is a supported arch."""
    return _model_type(model) in SUPPORTED_MODEL_TYPES


def _modeling(model_type: str):
    return importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")


# ------------------------------------------------------------------------------------------------
# Replacement forwards (bound per instance with types.MethodType, so deepcopy keeps them right)
# ------------------------------------------------------------------------------------------------
def _rms_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    y = rms_norm(hidden_states, self.weight, self.variance_epsilon)
    # The fused op saves x (contiguous: the same storage) and the weight for its own backward, so
    # q/k/v or gate/up need not save y again for their weight gradients: it is rebuilt from those
    # in backward (fastft/models/recompute.py; 2 x 1.125 MiB per SmolLM2 layer at 4x256 bf16). The
    # reference path saves fp32 copies instead of x: nothing to gain there.
    backend = rms_norm_node_backend(y) if recompute.active() else None
    if backend is not None and hidden_states.is_contiguous():
        recompute.register(y, rms_norm, hidden_states, self.weight, self.variance_epsilon, backend)
    return y


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)
    h = swiglu(gate, up)
    # The fused op saves gate and up (contiguous: the same storages): down_proj's saved copy of h
    # is rebuilt from them in backward (fastft/models/recompute.py; 3 MiB per SmolLM2 layer).
    backend = swiglu_node_backend(h) if recompute.active() else None
    if backend is not None and gate.is_contiguous() and up.is_contiguous():
        recompute.register(h, swiglu, gate, up, backend)
    return self.down_proj(h)


def _attn_forward(self, *args, **kwargs):
    token = _ROPE_ON.set(True)
    token_attn = _ATTN_ON.set(getattr(self, "_fastft_attention", False))
    try:
        return type(self).forward(self, *args, **kwargs)
    finally:
        _ATTN_ON.reset(token_attn)
        _ROPE_ON.reset(token)


def _sdpa_dispatcher(original):
    """HF's ``sdpa`` attention interface, with plain causal self-attention inside a patched
    module sent to fastft's kernel. Returns (B, T, Hq, D) like HF's."""
    def sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                               is_causal=None, **kwargs):
        seg = _SEGMENTS.get() if _ATTN_ON.get() else None
        plain = (_ATTN_ON.get() and attention_mask is None and dropout == 0.0
                 and (is_causal if is_causal is not None else getattr(module, "is_causal", True))
                 and query.shape[2] == key.shape[2] and not kwargs.get("output_attentions", False)
                 and all(kwargs.get(k) is None for k in _ATTN_EXTRAS))
        if plain:
            return causal_attention(query, key, value, scaling, segments=seg).transpose(1, 2), None
        if _ATTN_ON.get():
            module._fastft_sdpa_fallbacks = module.__dict__.get("_fastft_sdpa_fallbacks", 0) + 1
        if seg is not None and attention_mask is None:  # packed rows came without a mask: build it
            if "packed_sdpa" not in _WARNED:
                _WARNED.add("packed_sdpa")
                warnings.warn("fastft: an attention call of packed rows could not use fastft's kernel "
                              "(dropout or extra arguments); it runs HF's SDPA with a block mask", RuntimeWarning,
                              stacklevel=2)
            attention_mask = _segment_mask(seg, query)
            is_causal = False
        return original(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                        is_causal=is_causal, **kwargs)

    sdpa_attention_forward.__fastft_original__ = original
    return sdpa_attention_forward


def _install_attention() -> None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as fns

    if "previous" not in _SDPA_SAVED:
        _SDPA_SAVED["previous"] = fns._local_mapping.get("sdpa")
        fns["sdpa"] = _sdpa_dispatcher(fns["sdpa"])


def _uninstall_attention() -> None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as fns

    if "previous" in _SDPA_SAVED:
        prev = _SDPA_SAVED.pop("previous")
        if prev is None:
            fns._local_mapping.pop("sdpa", None)
        else:
            fns["sdpa"] = prev


def _mask_dispatcher(original):
    """The modeling module's ``create_causal_mask``: None inside :func:`packed_segments` (the
    attention reads the segments instead of a (B, 1, T, T) mask), the original elsewhere."""
    def create_causal_mask(*args, **kwargs):
        if _SEGMENTS.get() is not None:
            return None
        return original(*args, **kwargs)

    create_causal_mask.__fastft_original__ = original
    return create_causal_mask


def _rope_dispatcher(original):
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if _ROPE_ON.get():
            return rope(q, k, cos, sin, unsqueeze_dim)
        return original(q, k, cos, sin, unsqueeze_dim)

    apply_rotary_pos_emb.__fastft_original__ = original
    return apply_rotary_pos_emb


def _layer_forward(self, hidden_states, *args, **kwargs):
    """A whole decoder layer as one autograd node (fastft/models/fused_layer.py) when the call and the
    layer allow it (frozen norms and base weights, no mask/cache/hooks), else HF's forward."""
    plan = None
    if not args:
        plan = layer_plan(self, hidden_states, kwargs.get("attention_mask"), kwargs.get("past_key_values"),
                          kwargs.get("use_cache"), kwargs.get("position_embeddings"), kwargs)
    if plan is None:
        self._fastft_layer_fallbacks = self.__dict__.get("_fastft_layer_fallbacks", 0) + 1
        return type(self).forward(self, hidden_states, *args, **kwargs)
    return fused_layer_forward(plan, hidden_states, kwargs["position_embeddings"], _SEGMENTS.get())


def _is_silu(act: nn.Module) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _stop_hub_kernels(model: nn.Module) -> None:
    """Turn off transformers' hub-kernel layer (``use_kernels``) on every PreTrainedModel in
    ``model``, before patching.

    Why: with the ``kernels`` package installed, transformers 5 loads models with
    ``use_kernels=True`` by default, and every ``train()``/``eval()`` that changes the mode
    re-runs ``kernelize``, which resets the forward of each ``use_kernel_forward_from_hub`` module
    (the RMSNorms) and silently drops the patch below: the trainer's first ``train()`` sent every
    RMSNorm back to HF's eager code (no fused kernel, no recompute registration). Switching it
    off runs the torch fallbacks once (``reset_kernels``), so it must come before patching; the
    patched blocks use fastft's kernels instead of the hub's anyway."""
    for m in model.modules():
        if getattr(m, "_use_kernels", False) and hasattr(type(m), "use_kernels"):
            m.use_kernels = False


# ------------------------------------------------------------------------------------------------
def patch_blocks(model: nn.Module, attention: bool = True, layers: bool = True) -> dict[str, int]:
    """Route ``model``'s RMSNorm, SwiGLU MLP and rotary embedding through the fused ops,
    (``attention``) plain causal SDPA calls through :func:`fastft.ops.attention.causal_attention`,
    and (``layers``, needs ``attention``) whole decoder layers with frozen weights through
    :mod:`fastft.models.fused_layer`.

    Returns the number of modules patched per kind (``{"rms_norm": n, "mlp": n, "rope": n,
    "attention": n, "layer": n}``, attention counting the rope-patched modules that also route
    attention); all zeros for an unsupported architecture. Idempotent.
    """
    counts = {"rms_norm": 0, "mlp": 0, "rope": 0, "attention": 0, "layer": 0}
    mt = _model_type(model)
    if mt not in SUPPORTED_MODEL_TYPES:
        return counts
    _stop_hub_kernels(model)
    mod = _modeling(mt)
    prefix = _PREFIX[mt]
    norm_cls = getattr(mod, f"{prefix}RMSNorm")
    mlp_cls = getattr(mod, f"{prefix}MLP")
    attn_cls = getattr(mod, f"{prefix}Attention")
    layer_cls = getattr(mod, f"{prefix}DecoderLayer")
    for m in model.modules():
        if getattr(m, "_fastft_fused", False):
            continue
        if type(m) is norm_cls:
            m.forward = types.MethodType(_rms_forward, m)
            kind = "rms_norm"
        elif type(m) is mlp_cls and _is_silu(m.act_fn):
            m.forward = types.MethodType(_mlp_forward, m)
            kind = "mlp"
        elif type(m) is attn_cls:
            if mod.__name__ not in _ORIGINAL_ROPE:
                _ORIGINAL_ROPE[mod.__name__] = mod.apply_rotary_pos_emb
                mod.apply_rotary_pos_emb = _rope_dispatcher(mod.apply_rotary_pos_emb)
                _ORIGINAL_MASK[mod.__name__] = mod.create_causal_mask
                mod.create_causal_mask = _mask_dispatcher(mod.create_causal_mask)
            _PATCHED_ATTN.setdefault(mod.__name__, weakref.WeakSet()).add(m)
            m.forward = types.MethodType(_attn_forward, m)
            m._fastft_modeling = mod.__name__
            m._fastft_attention = bool(attention)
            if attention:
                _install_attention()
                counts["attention"] += 1
            kind = "rope"
        elif type(m) is layer_cls and layers and attention:
            m.forward = types.MethodType(_layer_forward, m)
            kind = "layer"
        else:
            continue
        m._fastft_fused = True
        counts[kind] += 1
    return counts


def unpatch_blocks(model: nn.Module) -> int:
    """Undo :func:`patch_blocks` on ``model``; returns the number of modules restored. The module
    global ``apply_rotary_pos_emb`` is restored once no live patched attention module is left
    (the dispatcher is harmless meanwhile: outside a patched module it calls the original)."""
    n = 0
    for m in model.modules():
        if not getattr(m, "_fastft_fused", False):
            continue
        if "forward" in m.__dict__:
            del m.forward
        name = m.__dict__.pop("_fastft_modeling", None)
        if name is not None:
            _PATCHED_ATTN[name].discard(m)
            m.__dict__.pop("_fastft_attention", None)
            # every modeling module without a live patched attention module gets its global back
            # (patched models that were simply dropped leave empty sets behind)
            for dead in [k for k, live in _PATCHED_ATTN.items() if not live]:
                importlib.import_module(dead).apply_rotary_pos_emb = _ORIGINAL_ROPE.pop(dead)
                importlib.import_module(dead).create_causal_mask = _ORIGINAL_MASK.pop(dead)
                del _PATCHED_ATTN[dead]
            if not _PATCHED_ATTN:
                _uninstall_attention()
        del m._fastft_fused
        n += 1
    return n
