"""Pieces of the training loop: dtype choice, the loss module, optimizer and lr schedule."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastft import _backend, hf_fast
from fastft.data.packing import block_causal_mask
from fastft.ops.segments import segments_from_cu_seqlens, segments_from_position_ids
from fastft.recompute import recompute_cheap


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from fastft.errors import ConfigError

        raise ConfigError("train.device=cuda: no CUDA device is available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 where the hardware has bf16 units (AVX-512 BF16 / AMX, Ampere+), else fp32
    on CPU and fp16 on GPU. bf16 GEMMs run ~2.3x fp32 on this EPYC (ENVIRONMENT.md)."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        ok = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)()
        return torch.bfloat16 if ok else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[name]


def unwrap(model: nn.Module) -> nn.Module:
    """The HF ``*ForCausalLM`` inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def ce_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
           label_smoothing: float, fused: bool) -> torch.Tensor:
    """Sum of token cross-entropies, fp32 scalar.

    Args:
        hidden: (N, H) final hidden states of the target positions only.
        weight: (V, H) output head weight; bias: (V,) or None.
        targets: (N,) int64 token ids.
        fused: use fastft.ops.fused_linear_cross_entropy (no (N, V) logits); False builds them.
    """
    if fused:
        from fastft.ops.fused_linear_cross_entropy import fused_linear_cross_entropy

        return fused_linear_cross_entropy(hidden, weight, targets, bias, reduction="sum",
                                          label_smoothing=label_smoothing)
    w = weight if weight.dtype == hidden.dtype else weight.to(hidden.dtype)  # fp32 tied head: as autocast
    logits = F.linear(hidden, w, None if bias is None else bias.to(hidden.dtype)).float()  # (N, V)
    return F.cross_entropy(logits, targets, reduction="sum", label_smoothing=label_smoothing)


def causal_suffices(attention_mask: torch.Tensor, labels: torch.Tensor, position_ids=None) -> bool:
    """True when plain causal attention gives every position the loss reads the same output as
    the mask: a (B, T) 0/1 mask whose rows are right-padded (ones, then zeros) and whose pad
    positions carry no target. A real token never attends to a later key, so it never sees a pad
    key; pad positions see other pads, but only their own targets could read them, and those are
    -100. Then SDPA takes its causal fast path and fastft's causal kernels run (a mask sends
    them to HF's SDPA), instead of a materialised (B, 1, T, T) mask. Exact, not approximate."""
    if attention_mask.dim() != 2 or position_ids is not None:
        return False
    m = attention_mask
    # one device-side expression, read once: on a GPU each bool() is a host sync (there were four)
    right_padded = ((m == 0) | (m == 1)).all() & (m[:, 1:] <= m[:, :-1]).all()
    pads_ignored = ~((m == 0) & (labels != -100)).any()
    return bool(m.all() | (right_padded & pads_ignored))


def _right_padded(m: torch.Tensor) -> bool:
    """(B, T) 0/1 rows of ones then zeros."""
    return bool(((m == 0) | (m == 1)).all()) and bool((m[:, 1:] <= m[:, :-1]).all())


def attention_inputs(lm: nn.Module, attention_mask: torch.Tensor, labels: torch.Tensor, position_ids=None,
                     cu_seqlens=None):
    """How the decoder should see a batch: (mask for HF or None, Segments or None).

    * Rows that are plain causal (no padding, no position ids): (None, None).
    * Packed rows (``position_ids`` restarting at 0 per sample) or right-padded rows whose pads
      carry no target, on a model whose attention fastft routes (``hf_fast.routes_attention``):
      (None, the rows' :class:`~fastft.ops.segments.Segments`): a pad tail is one more sample,
      nothing T x T is built and the fused layers run.
    * ``cu_seqlens`` ((N + 1,) int, FlashAttention's varlen convention over the B * T tokens,
      pad tails as samples) when given describes the samples in place of the position ids.
    * Otherwise what HF needs: a 4-D mask as given; packed rows get the (B, 1, T, T) block mask
      (said once); right-padded rows without pad targets none (:func:`causal_suffices`); else the
      2-D mask.
    """
    if attention_mask.dim() != 2:
        return attention_mask, None
    if position_ids is None and bool(attention_mask.all()):
        return None, None
    pads_untargeted = bool((labels[attention_mask == 0] == -100).all())
    if position_ids is None and cu_seqlens is None and causal_suffices(attention_mask, labels):
        # right-padded rows: plain causal is exact for every target; the segments (pad tail apart)
        # only save work in fastft's own kernels (pads stop attending the real tokens), not where
        # the device's default attention is the vendor's SDPA
        if _backend.choose_backend("attention", attention_mask.device) == "torch":
            return None, None
    if _right_padded(attention_mask) and pads_untargeted and hf_fast.routes_attention(lm):
        if cu_seqlens is not None:
            return None, segments_from_cu_seqlens(cu_seqlens, *attention_mask.shape)
        pos = position_ids if position_ids is not None else torch.arange(
            attention_mask.shape[1], device=attention_mask.device)[None]  # one sample (+ pad tail) per row
        return None, segments_from_position_ids(pos.expand(attention_mask.shape[0], -1), attention_mask)
    if position_ids is not None:
        _warn_once_packed()
        return block_causal_mask(position_ids, attention_mask, _mask_dtype(lm)), None
    return (None if causal_suffices(attention_mask, labels) else attention_mask), None


def _mask_dtype(lm: nn.Module) -> torch.dtype:
    p = next((p for p in lm.parameters() if p.is_floating_point()), None)
    return torch.float32 if p is None else p.dtype


_WARNED: set = set()


def _warn_once_packed() -> None:
    if "packed" not in _WARNED:
        _WARNED.add("packed")
        import warnings

        warnings.warn("fastft: packed rows run with a (B, 1, T, T) block mask and HF's attention (the model's "
                      "attention is not routed through fastft: unsupported architecture, model.fused_attention "
                      "off, attn_implementation other than sdpa, or gradient checkpointing)", RuntimeWarning,
                      stacklevel=3)


class CausalLMLoss(nn.Module):
    """Wraps a causal LM so ``forward`` returns (sum of target-token losses, target count).

    Only positions with a target (label != -100 after the shift) go through the output head:
    with prompt masking that is about half the tokens, and the (N, V) logits never exist for the
    rest. The caller divides by the number of target tokens of the whole optimizer step.
    """

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0, fused_ce: bool = True,
                 recompute_cheap: bool = True):
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing
        self.fused_ce = fused_ce
        self.recompute_cheap = recompute_cheap

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                position_ids: torch.Tensor | None = None, smoothing: bool = True,
                cu_seqlens: torch.Tensor | None = None):
        """input_ids/labels: (B, T) int64; attention_mask (B, T) 0/1 (or a (B, 1, T, T) additive
        mask); position_ids (B, T), restarting at 0 per sample in packed rows. Returns (fp32 loss
        sum, int64 target count)."""
        lm = unwrap(self.model)
        mask, segments = attention_inputs(lm, attention_mask, labels, position_ids, cu_seqlens)
        # saved RMSNorm/SwiGLU outputs are rebuilt in backward (fastft/recompute.py; a no-op
        # without grad, and inside checkpointed layers, whose own hooks take over)
        with recompute_cheap(self.recompute_cheap), hf_fast.packed_segments(segments):
            out = lm.base_model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                                use_cache=False)
        h = out.last_hidden_state  # (B, T, H)
        targets = labels[:, 1:]
        keep = targets != -100
        hs = h[:, :-1][keep]  # (N, H)
        t = targets[keep]
        head = lm.get_output_embeddings()
        ls = self.label_smoothing if smoothing else 0.0
        loss = ce_sum(hs, head.weight, getattr(head, "bias", None), t, ls, self.fused_ce)
        return loss, keep.sum()


def build_optimizer(groups: list[dict], cfg_train, low_precision: bool) -> torch.optim.Optimizer:
    """FusedAdamW over the groups: fused global-norm clipping, fp32-exact masters for bf16/fp16
    params (bf16: ``train.master_format``, split by default; fp16: always a full fp32 copy)."""
    from fastft.optim import FusedAdamW

    clean = [{**{k: v for k, v in g.items() if k != "names"}, "base_lr": g["lr"]} for g in groups]
    return FusedAdamW(clean, lr=cfg_train.lr, betas=(cfg_train.adam_beta1, cfg_train.adam_beta2),
                      eps=cfg_train.adam_eps, weight_decay=cfg_train.weight_decay,
                      # inf: no clipping, but the norm is still computed and a non-finite one skips the step
                      max_grad_norm=cfg_train.max_grad_norm or float("inf"), master_weights=low_precision,
                      master_format=cfg_train.master_format)


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based): linear warmup from
    1/warmup to 1, then linear/cosine decay to 0 at ``total``, or constant."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * factor


class LrSchedule:
    """``lr_factor`` over ``total`` steps, plus how a resumed run continues when its length changes.

    The rule when ``train.max_steps`` (or epochs) changes at a resume from step ``s0``: every step
    already taken keeps its lr, and the lr never jumps. While the run is still warming up
    (``s0 <= warmup``) the schedule is recomputed over the new total with the same number of warmup
    steps (the warmup steps taken are unchanged). Later, the lr continues from the factor ``f`` of
    the last step taken (``s0 - 1``) and decays with the same shape (linear/cosine; constant stays
    constant) to 0 at the new total: ``factor(s) = f * shape((s - s0 + 1) / (total - s0 + 1))``.
    So a finished cosine run extended from 10 to 20 steps continues at its small final lr instead
    of restarting the decay (which jumped 2e-4 -> 1.5e-3 before); to re-warm, start a new run from
    ``<run>/final``.
    """

    def __init__(self, total: int, warmup: int, kind: str):
        self.total, self.warmup, self.kind = total, warmup, kind
        self.anchor: tuple[int, float] | None = None  # (last step taken, its factor) of an extension
        self.before: LrSchedule | None = None  # the schedule of the steps before the anchor

    def factor(self, step: int) -> float:
        """Multiplier of the peak lr at 0-based optimizer step ``step``."""
        if self.anchor is None:
            return lr_factor(step, self.total, self.warmup, self.kind)
        if step < self.anchor[0]:
            return self.before.factor(step)
        s, f = self.anchor
        if self.kind == "constant":
            return f
        p = min(1.0, (step - s) / max(1, self.total - s))
        return f * (1.0 - p if self.kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * p)))

    def extend(self, step: int, total: int) -> str:
        """Continue at step ``step`` (steps taken so far) to ``total`` steps; returns the one-line
        description of how the schedule continues."""
        old = self.total
        if step <= self.warmup:
            self.total = total
            return (f"train.max_steps {old} -> {total} at step {step}: still in warmup; the {self.kind} schedule "
                    f"is recomputed over {total} steps (the steps taken keep their lr)")
        last = step - 1
        f = self.factor(last)
        prev = LrSchedule(old, self.warmup, self.kind)
        prev.anchor, prev.before = self.anchor, self.before
        self.anchor, self.before, self.total = (last, f), prev, total
        how = "stays constant" if self.kind == "constant" else f"decays ({self.kind}) to 0 at step {total}"
        return (f"train.max_steps {old} -> {total} at step {step}: the lr continues from the last step's "
                f"(x{f:.3g} of train.lr) and {how}; steps 1-{step} keep their lr")

    def state_dict(self) -> dict:
        return {"total": self.total, "warmup": self.warmup, "kind": self.kind, "anchor": self.anchor,
                "before": self.before.state_dict() if self.before else None}

    def load_state_dict(self, st: dict) -> None:
        self.total, self.warmup, self.kind = st["total"], st["warmup"], st["kind"]
        self.anchor = tuple(st["anchor"]) if st.get("anchor") else None
        self.before = None
        if st.get("before"):
            self.before = LrSchedule(1, 0, self.kind)
            self.before.load_state_dict(st["before"])
