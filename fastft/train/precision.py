"""Mixed-precision weight policy: fp32 embeddings and norm weights in a bf16/fp16 model.

fastft runs the forward on 16-bit weights (fp32 masters live in ``fastft.optim.FusedAdamW``).
For matmul weights that matches HF's autocast, which rounds them to bf16 too. Autocast leaves the
input embedding (tied to ``lm_head`` in e.g. SmolLM2) and the RMSNorm weights in fp32, though,
and Adam's first updates (about lr = 2e-5 per element) are below bf16's resolution for those
weights (|w| ~ 0.02-1: spacing 1e-4 to 8e-3), so an all-bf16 forward does not see them: on
SmolLM2 full fine-tuning the loss curve drifted 10-16% from HF's after a few steps, and agreed
within 1.9% with fp32 weights (benchmarks/README.md).

:func:`keep_fp32_weights` therefore stores the *trainable* (now or after progressive unfreezing)
embedding and RMSNorm weights in fp32 while every matmul weight stays in the run dtype:

* the input embedding's output is cast back to the run dtype by a forward hook, so the residual
  stream stays 16-bit;
* RMSNorm modules get a forward hook that returns the input's dtype (fastft's fused
  :func:`fastft.ops.rms_norm.rms_norm` already does; HF's own ``LlamaRMSNorm`` would promote to
  fp32). Other norm types (LayerNorm, ...) keep the run dtype: their kernels' mixed-dtype
  support is not checked here;
* a tied ``lm_head`` (the same Parameter as the embedding) gets a forward pre-hook casting its
  input to fp32, so HF's ordinary forward (eval, generation) gives fp32 logits; the training
  loss (``fastft.train.utils.ce_sum``) casts the weight to the hidden dtype for its GEMMs.

FusedAdamW keeps no master copy of fp32 parameters (they are their own master), so the
optimizer's memory does not grow; the weights themselves grow by 2 bytes per element
(SmolLM2-135M: 28.3M embedding + 35K norm elements, 57 MB).
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["attach_fp32_sources", "keep_fp32_weights", "record_run_dtype", "trainable_eventually"]

_LOW = (torch.bfloat16, torch.float16)


def trainable_eventually(model: nn.Module, ft_cfg) -> set[int]:
    """ids of the parameters that train now or after progressive unfreezing (``requires_grad``
    is left as it was)."""
    from fastft.train.finetune import apply_freezing

    ids = {id(p) for p in model.parameters() if p.requires_grad}
    if ft_cfg.mode != "lora" and ft_cfg.unfreeze_after_steps > 0:
        state = [(p, p.requires_grad) for p in model.parameters()]
        apply_freezing(model, ft_cfg, unfrozen=True)
        ids |= {id(p) for p in model.parameters() if p.requires_grad}
        for p, rg in state:
            p.requires_grad_(rg)
    return ids


def _is_rms_norm(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return type(m).__name__.lower().endswith("rmsnorm") and isinstance(w, nn.Parameter) and w.dim() == 1


def _cast_output_to(dtype: torch.dtype):
    def hook(_module, _args, out):
        return out.to(dtype) if torch.is_tensor(out) and out.is_floating_point() else out
    return hook


def _cast_output_to_input(_module, args, out):
    if args and torch.is_tensor(args[0]) and torch.is_tensor(out) and out.dtype != args[0].dtype:
        return out.to(args[0].dtype)
    return out


def _cast_input_to_fp32(_module, args):
    if args and torch.is_tensor(args[0]) and args[0].dtype in _LOW:
        return (args[0].float(),) + tuple(args[1:])
    return None


def _to_fp32(p: nn.Parameter) -> None:
    # in place on the Parameter object: tied modules and the optimizer see the same tensor
    p.data = p.data.float()


def keep_fp32_weights(model: nn.Module, ft_cfg) -> dict[str, int]:
    """Apply the policy above to ``model`` (after freezing is decided, before the optimizer).

    No-op unless some parameter is bf16/fp16 and the mode is not ``lora`` (LoRA freezes the
    embeddings and norms: they stay 16-bit to save memory). Returns counts
    ``{"embedding": 0/1, "rms_norm": n, "tied_head": 0/1}`` of modules switched to fp32.
    """
    counts = {"embedding": 0, "rms_norm": 0, "tied_head": 0}
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    low = [d for d in _LOW if d in dtypes]
    if ft_cfg.mode == "lora" or not low:
        return counts
    run_dtype = low[0]
    model._fastft_run_dtype = run_dtype  # for record_run_dtype (HF would record fp32 on save)
    remove_fp32_hooks(model)  # a second call (the next Recipe trial) must not stack casts
    hooks = model._fastft_fp32_hooks = []
    train = trainable_eventually(model, ft_cfg)
    emb = model.get_input_embeddings()
    w = getattr(emb, "weight", None)
    if isinstance(w, nn.Parameter) and id(w) in train and w.dtype in _LOW:
        _to_fp32(w)
        hooks.append(emb.register_forward_hook(_cast_output_to(run_dtype)))
        counts["embedding"] = 1
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is not None and getattr(head, "weight", None) is w:
            hooks.append(head.register_forward_pre_hook(_cast_input_to_fp32))
            counts["tied_head"] = 1
    for m in model.modules():
        if _is_rms_norm(m) and id(m.weight) in train and m.weight.dtype in _LOW:
            _to_fp32(m.weight)
            hooks.append(m.register_forward_hook(_cast_output_to_input))
            counts["rms_norm"] += 1
    return counts


def remove_fp32_hooks(model: nn.Module) -> None:
    """Undo the casts :func:`keep_fp32_weights` hooked in (``Recipe.reset`` before the next
    trial: a trial that freezes the tied embedding again must not get the fp32 head cast)."""
    for h in getattr(model, "_fastft_fp32_hooks", ()):
        h.remove()
    model._fastft_fp32_hooks = []


def record_run_dtype(model: nn.Module, folder) -> None:
    """After ``save_pretrained(folder)``: HF writes ``config.dtype`` = the first parameter's dtype,
    which is the fp32 embedding under this policy; record the run dtype instead, so
    ``from_pretrained(folder)`` gives the bf16 model it did before (the fp32 tensors stay in the
    file: ``from_pretrained(folder, dtype=torch.float32)`` keeps them exact)."""
    import json
    from pathlib import Path

    dt = getattr(model, "_fastft_run_dtype", None)
    cfg_path = Path(folder) / "config.json"
    if dt is None or not cfg_path.is_file():
        return
    cfg = json.loads(cfg_path.read_text())
    if "dtype" in cfg or "torch_dtype" in cfg:
        cfg["dtype" if "dtype" in cfg else "torch_dtype"] = str(dt).split(".")[1]
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def attach_fp32_sources(model: nn.Module, folder: str) -> int:
    """Start the fp32 weights from the fp32 source values, not from the 16-bit params.

    79.3% of SmolLM2's fp32 weights (dequantised GGUF) are off the bf16 grid, and a +-2e-5 step
    flips the bf16 rounding of 14.9% of them: with HF's autocast that works like stochastic
    rounding of the update (in expectation the fp32 step). Masters copied from the bf16 params
    start *on* the grid, so no bf16 weight moved until its master had drifted half an ulp, and the
    full-mode loss drifted 17.7% from HF's in 4 steps (benchmarks/README.md). Here, for every
    trainable parameter found in ``folder``'s fp32 safetensors: an fp32 param (embeddings/norms
    kept by :func:`keep_fp32_weights`) gets the source values; a 16-bit one gets them attached
    as ``_fastft_master_init``, which FusedAdamW takes as its master copy. Returns the count.
    """
    from pathlib import Path

    from safetensors import safe_open

    want = {}
    for name, p in model.named_parameters():
        if p.requires_grad or p.dtype == torch.float32:
            want.setdefault(name, p)
    n = 0
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                p = want.get(key)
                if p is None or p.dtype not in (torch.float32,) + _LOW:
                    continue
                t = fh.get_tensor(key)
                if t.dtype != torch.float32 or t.shape != p.shape:
                    continue
                if p.dtype == torch.float32:
                    with torch.no_grad():
                        p.copy_(t)
                elif p.requires_grad:
                    p._fastft_master_init = t
                n += 1
    return n
