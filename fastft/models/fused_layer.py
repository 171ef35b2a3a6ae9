"""One autograd node per Llama-family decoder layer when its weights are frozen (LoRA training).

Why: after the GEMMs and the fused kernels, a LoRA step on this 2-core CPU spent ~7% of its
time in serial host work (Python, the dispatcher, one autograd node per view, malloc; `perf`
on a 64-token step put the second core idle 56% of the time) and a few percent in passes the
layer structure makes redundant (the residual adds as separate ops, the autograd engine summing
the three q/k/v input gradients). Here a decoder layer is one :class:`torch.autograd.Function`
whose forward and backward call the fused ops' public forward/backward pairs (``rms_norm_fwd`` /
``rms_norm_bwd`` and the like: the very functions each op's own autograd.Function calls), so
every backend (cpu, triton, cuda) and every projection kind is the code the per-op path runs,
with the same rounding:

    x1 = rms_norm(h)            q, k, v = proj(x1)     q, k = rope(q, k)
    o  = causal_attention(q, k, v)                     h2 = h + o_proj(o)
    x2 = rms_norm(h2)           y = h2 + down(swiglu(gate(x2), up(x2)))

Packed rows (several samples per row, or a pad tail; :mod:`fastft.ops.segments`) run here too:
the attention takes the rows' sample layout instead of a mask, and RoPE the per-sample cos/sin
HF computed from the position ids ((B, T, D) tables).

A projection is a frozen ``nn.Linear``, an :class:`fastft.models.lora.Int8Linear`, or an unmerged
:class:`fastft.models.lora.LoRALinear` (its A and B are the node's differentiable inputs). Anything
else — trainable norms or base weights (full / partial fine-tuning), Qwen3's q/k norms, an
attention mask (packed and right-padded rows come without one, see above), a KV cache, gradient
checkpointing, forward hooks (HF's output capture; FSDP2's own excepted), a ``torch`` backend
forced for any of the ops — runs the per-op path (:func:`layer_plan` says which), so this is purely a speed path: the
per-op path is its test oracle.

Saved for backward (per layer, 4x256 SmolLM2 bf16): what the ops save (h, h2 and rstd for the
norms; x1 and the r-wide LoRA activations; rotated q, k, v, the attention output and lse;
gate and up), nothing else. x1 (1.1 MiB) is kept where the per-op path's recompute_cheap would
rebuild it; the bench's peak RSS did not move (1205 MB).

Measured (SmolLM2 LoRA r=16 q,v, 4x256 bf16, 2-core EPYC; steps alternating in one process): the
step takes 0.964x and 0.981x the per-op path's time (two runs); with an int8 base 1.875 vs
2.138 s and 1312 vs 1405 MB peak RSS (benchmarks/README.md, Step 6).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from fastft import _backend
from fastft.models.lora import Int8Linear, LoRALinear
from fastft.ops.attention import attention_bwd, attention_fwd, attention_kernel_ok
from fastft.ops.lora_linear import (Int8Weight, int8_linear_bwd, int8_linear_fwd, linear_backend, lora_linear_bwd,
                                    lora_linear_fwd)
from fastft.ops.rms_norm import rms_norm_bwd, rms_norm_fwd, rms_norm_kernel_ok
from fastft.ops.rope import rope_bwd, rope_fwd, rope_kernel_ok
from fastft.ops.swiglu import swiglu_bwd, swiglu_fwd

try:  # FSDP2's per-module state (its hooks are bound methods of it); absent without distributed
    from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState as _FSDPState
except ImportError:
    class _FSDPState:  # nothing is an instance
        pass

__all__ = ["layer_plan", "fused_layer_forward"]

_PROJ_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# HF attention kwargs that change the maths (as in hf_fast's SDPA dispatcher)
_ATTN_EXTRAS = ("softcap", "position_bias", "cache", "s_aux", "sinks")


# ------------------------------------------------------------------------------------------------
# Projections
# ------------------------------------------------------------------------------------------------
def _frozen(m: nn.Module) -> bool:
    return not any(p.requires_grad for p in m.parameters())


def _proj_kind(m: nn.Module) -> str | None:
    if isinstance(m, LoRALinear):
        if m.merged or not _frozen(m.base_layer):
            return None
        return "lora"
    if isinstance(m, Int8Linear):
        return "int8" if _frozen(m) else None
    if type(m) is nn.Linear and _frozen(m):
        return "linear"
    return None


def _lora_params(m: nn.Module) -> list[Tensor]:
    return [m.lora_A.weight, m.lora_B.weight] if isinstance(m, LoRALinear) else []


def _proj_fwd(m: nn.Module, kind: str, x: Tensor):
    """y = m(x) for a 2-D contiguous x; returns (y, state for :func:`_proj_bwd`)."""
    if kind == "linear":
        return nn.functional.linear(x, m.weight, m.bias), None
    if kind == "int8":
        w = m.weight_int8()
        bias = m.bias.to(x.dtype) if m.bias is not None and m.bias.dtype != x.dtype else m.bias
        return int8_linear_fwd(x, w, bias, linear_backend(w, x))
    base = m._base_weight()
    A, B = m.lora_A.weight, m.lora_B.weight
    bias = m.base_layer.bias
    bias = bias.to(x.dtype) if bias is not None and bias.dtype != x.dtype else bias
    p = m.dropout if m.training else 0.0
    return lora_linear_fwd(x, base, A, B, bias, float(m.scaling), float(p), linear_backend(base, x))


def _proj_bwd(m: nn.Module, kind: str, state, dy: Tensor, need_x: bool, grads: dict):
    """dX (or None when not needed) for dY; LoRA weight grads go into ``grads``.

    Sums of input gradients (q/k/v, gate/up) are separate bf16 adds, as autograd does on the
    per-op path, not the GEMMs' accumulate (``acc=`` of lora_linear_bwd/int8_linear_bwd): the
    accumulate was within noise in the step (40 paired steps: 1.008, benchmarks/README.md Step 7)
    and, on an AVX2-only EPYC, put the int8 LoRA gradients' bf16 error at 2.18x the per-op
    path's (o_proj.lora_A, tests/test_fused_layer.py) against 1.18x with separate adds."""
    if kind == "linear":
        if not need_x:
            return None
        return dy @ m.weight
    if kind == "int8":
        if not need_x:
            return None
        return int8_linear_bwd(state, dy)[0]
    A, B = m.lora_A.weight, m.lora_B.weight
    dx, dA, dB, _ = lora_linear_bwd(state, dy, need_x, A.requires_grad, B.requires_grad)
    grads[A] = dA
    grads[B] = dB
    return dx


# ------------------------------------------------------------------------------------------------
# The plan: which modules, which kinds, which backends (None = take the per-op path)
# ------------------------------------------------------------------------------------------------
class _Plan:
    __slots__ = ("attn", "norms", "projs", "kinds", "params", "backends", "segments")


def _hooked(m: nn.Module) -> bool:
    """Any hook but FSDP2's own: those (unshard before the layer's forward, reshard after it,
    reduce-scatter after its backward) act on the layer's parameters and boundary tensors, which
    the node takes as they are at call time, so a sharded layer keeps the fused path."""
    hooks = [*m._forward_hooks.values(), *m._forward_pre_hooks.values(), *m._backward_hooks.values(),
             *(getattr(m, "_backward_pre_hooks", None) or {}).values()]
    return any(not isinstance(getattr(h, "__self__", None), _FSDPState) for h in hooks)


def layer_plan(layer: nn.Module, hidden_states: Tensor, attention_mask, past_key_values, use_cache,
               position_embeddings, kwargs: dict) -> _Plan | None:
    """A plan for :func:`fused_layer_forward`, or None when this call must take the per-op path
    (see the module docstring for the conditions)."""
    if not torch.is_grad_enabled() or attention_mask is not None or position_embeddings is None:
        return None
    if past_key_values is not None or use_cache or getattr(layer, "gradient_checkpointing", False):
        return None
    if any(kwargs.get(k) is not None for k in _ATTN_EXTRAS) or kwargs.get("output_attentions"):
        return None
    if (nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks
            or nn.modules.module._global_backward_hooks):
        return None
    attn, mlp = layer.self_attn, layer.mlp
    if hasattr(attn, "q_norm") or hasattr(attn, "k_norm") or not getattr(attn, "is_causal", True):
        return None
    if attn.training and attn.attention_dropout:
        return None
    norms = (layer.input_layernorm, layer.post_attention_layernorm)
    if hidden_states.dim() != 3:
        return None
    if getattr(mlp, "_fastft_fused", False) is False or not getattr(attn, "_fastft_attention", False):
        return None
    mods = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    kinds = tuple(_proj_kind(m) for m in mods)
    if None in kinds:
        return None
    for m in (layer, attn, mlp, *norms, *mods):
        if _hooked(m):
            return None
    dev = hidden_states.device
    backends = {op: _backend.choose_backend(op, dev) for op in ("rms_norm", "swiglu", "rope", "attention")}
    if "torch" in backends.values():
        return None
    if any(n.weight.requires_grad or not rms_norm_kernel_ok(hidden_states, n.weight, backends["rms_norm"])
           for n in norms):
        return None
    if not attention_kernel_ok(hidden_states.dtype, attn.head_dim, backends["attention"]):
        return None
    cos, sin = position_embeddings
    if cos.dtype != hidden_states.dtype or cos.dim() != 3 or cos.requires_grad or sin.requires_grad:
        return None
    plan = _Plan()
    plan.attn, plan.norms, plan.projs, plan.kinds, plan.backends = attn, norms, mods, kinds, backends
    plan.params = [p for m in mods for p in _lora_params(m)]
    plan.segments = None
    return plan


# ------------------------------------------------------------------------------------------------
# The autograd node
# ------------------------------------------------------------------------------------------------
class _DecoderLayerFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, cos: Tensor, sin: Tensor, plan: _Plan, *params: Tensor) -> Tensor:
        B, T, H = h.shape
        attn, be = plan.attn, plan.backends
        hq, hkv, d = attn.config.num_attention_heads, attn.config.num_key_value_heads, attn.head_dim
        n1, n2 = plan.norms
        x = h.reshape(B * T, H)
        x = x if x.is_contiguous() else x.contiguous()
        x1, c_n1 = rms_norm_fwd(x, n1.weight, n1.variance_epsilon, be["rms_norm"])
        states = []
        ys = []
        for m, kind in zip(plan.projs[:3], plan.kinds[:3]):
            y, st = _proj_fwd(m, kind, x1)
            ys.append(y)
            states.append(st)
        q, k, v = ys
        q4, k4, v4 = q.view(B, T, hq, d), k.view(B, T, hkv, d), v.view(B, T, hkv, d)
        if not rope_kernel_ok(q4, k4, cos, sin, 2):
            raise RuntimeError("fused decoder layer: rotary table does not fit the kernel")  # plan checked
        qr, kr, c_rope = rope_fwd(q4, k4, cos, sin, 2, be["rope"])
        o, c_att = attention_fwd(qr.transpose(1, 2), kr.transpose(1, 2), v4.transpose(1, 2),
                                 float(attn.scaling), be["attention"], plan.segments)
        o2 = o.transpose(1, 2).reshape(B * T, hq * d)  # a view: the kernel writes (B, T, Hq, D)
        a, st = _proj_fwd(plan.projs[3], plan.kinds[3], o2)
        states.append(st)
        h2 = a.add_(x)  # residual + attention (bf16 add commutes: HF's rounding)
        x2, c_n2 = rms_norm_fwd(h2, n2.weight, n2.variance_epsilon, be["rms_norm"])
        g, st = _proj_fwd(plan.projs[4], plan.kinds[4], x2)
        states.append(st)
        u, st = _proj_fwd(plan.projs[5], plan.kinds[5], x2)
        states.append(st)
        act, c_sw = swiglu_fwd(g, u, be["swiglu"])
        y, st = _proj_fwd(plan.projs[6], plan.kinds[6], act)
        states.append(st)
        out = y.add_(h2)
        ctx.plan, ctx.shape, ctx.dims = plan, (B, T, H), (hq, hkv, d)
        ctx.op_ctx = (c_n1, c_rope, c_att, c_n2, c_sw)
        ctx.states = states
        return out.view(B, T, H)

    @staticmethod
    def backward(ctx, dout: Tensor):
        plan = ctx.plan
        if ctx.states is None:
            raise RuntimeError("fused decoder layer: backward ran twice through the same graph (retain_graph); "
                               "set model.fused_layers=false to keep per-op saved tensors")
        B, T, H = ctx.shape
        hq, hkv, d = ctx.dims
        c_n1, c_rope, c_att, c_n2, c_sw = ctx.op_ctx
        st = ctx.states
        P, K = plan.projs, plan.kinds
        grads: dict = {}
        dy = dout.reshape(B * T, H)
        dy = dy if dy.is_contiguous() else dy.contiguous()
        dact = _proj_bwd(P[6], K[6], st[6], dy, True, grads)
        dg, du = swiglu_bwd(c_sw, dact)
        dx2 = _proj_bwd(P[4], K[4], st[4], dg, True, grads)
        dx2 = dx2.add_(_proj_bwd(P[5], K[5], st[5], du, True, grads))
        dh2 = rms_norm_bwd(c_n2, dx2, need_weight=False)[0].add_(dy)
        do = _proj_bwd(P[3], K[3], st[3], dh2, True, grads)
        dq, dk, dv = attention_bwd(c_att, do.view(B, T, hq, d).transpose(1, 2))
        dq, dk = rope_bwd(c_rope, dq.transpose(1, 2), dk.transpose(1, 2))
        need_h = ctx.needs_input_grad[0]
        dx1 = None
        for m, kind, s, g in zip(P[:3], K[:3], st[:3], (dq, dk, dv.transpose(1, 2))):
            dx = _proj_bwd(m, kind, s, g.reshape(B * T, -1), need_h, grads)
            dx1 = dx if dx1 is None or dx is None else dx1.add_(dx)
        dh = None
        if need_h:
            dh = rms_norm_bwd(c_n1, dx1, need_weight=False)[0].add_(dh2).view(B, T, H)
        ctx.states = ctx.op_ctx = None  # free the saved activations as soon as possible
        return (dh, None, None, None, *(grads.get(p) for p in plan.params))


def fused_layer_forward(plan: _Plan, hidden_states: Tensor, position_embeddings, segments=None) -> Tensor:
    """The decoder layer's output for a plan from :func:`layer_plan`.

    Args:
        hidden_states: (B, T, H).
        position_embeddings: HF's (cos, sin), each (1 or B, T, head_dim).
        segments: None (causal rows) or the rows' :class:`fastft.ops.segments.Segments` ((B, T)).
    """
    if segments is not None and segments.shape != tuple(hidden_states.shape[:2]):
        raise ValueError(f"fused decoder layer: segments of shape {segments.shape} for hidden states "
                         f"{tuple(hidden_states.shape)}")
    plan.segments = segments
    cos, sin = position_embeddings
    return _DecoderLayerFn.apply(hidden_states, cos, sin, plan, *plan.params)
