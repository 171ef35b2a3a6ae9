"""``FusedAdamW``: torch.optim.AdamW semantics, one fused pass, optional fused gradient clipping.

    opt = FusedAdamW(model.parameters(), lr=2e-4, weight_decay=0.01, max_grad_norm=1.0,
                     master_weights=True)      # bf16 params -> fp32-exact master + fp32 moments
    loss.backward(); opt.step(); opt.zero_grad()
    log(opt.last_grad_norm)                    # 0-dim fp32 tensor, pre-clip norm of this step

The state dict uses torch.optim.AdamW's keys (``step``, ``exp_avg``, ``exp_avg_sq``,
``max_exp_avg_sq``), so either optimizer loads the other's ``state_dict()``. With master weights
a param's state also holds its master: ``master_param`` (fp32, param shape) for fp16 params and
with ``master_format="fp32"``, or ``master_lo`` (int16, param shape: the low half of the fp32
master whose high half is the bf16 param itself) for bf16 params with the default
``master_format="split"``. A ``master_lo`` is only meaningful with the bf16 param values it was
saved with (a fastft checkpoint stores both); loading a state dict whose master is in the other
format converts it at the next step, exactly. The maths and the backends are in
:mod:`fastft.ops.adamw`.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

from fastft.errors import ConfigError, UserError
from fastft.ops.adamw import (AdamWGroup, fused_adamw, grad_sumsq, group_state_ptrs, split_master_decode,
                              split_master_encode)

try:  # torch built without distributed support has no DTensor
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover
    DTensor, Shard = (), ()

__all__ = ["FusedAdamW"]

_MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master_param")
_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MASTER_FORMATS = ("split", "fp32")


def _local(t: Tensor | None) -> Tensor | None:
    """This rank's shard of a DTensor (a fixed view into FSDP2's sharded storage: no copy, no
    new DTensor per step); any other tensor as it is."""
    return t._local_tensor if isinstance(t, DTensor) else t


def reduce_sumsq(sumsq: Tensor, p: Tensor) -> Tensor:
    """Sum a rank's squared gradient norm over the ranks that shard ``p`` (in place). Module
    level so that a test can replace it with the identity (per-rank clipping) and see it fail."""
    import torch.distributed as dist

    dist.all_reduce(sumsq, op=dist.ReduceOp.SUM, group=p.device_mesh.get_group())
    return sumsq


def _check_hparams(lr: Any, betas: Any, eps: Any, weight_decay: Any, where: str = "FusedAdamW") -> None:
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ConfigError(f"{where}: lr tensor must have 1 element, got shape {tuple(lr.shape)}")
        if lr.device.type == "cpu" and not float(lr) >= 0.0:
            raise ConfigError(f"{where}: lr={float(lr)!r}: expected a finite number >= 0")
    elif not isinstance(lr, (int, float)) or not lr >= 0.0 or math.isinf(lr):
        raise ConfigError(f"{where}: lr={lr!r}: expected a finite number >= 0")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ConfigError(f"{where}: betas={betas!r}: expected a pair (beta1, beta2)")
    for i, b in enumerate(betas):
        if isinstance(b, Tensor) or not isinstance(b, (int, float)) or not 0.0 <= b < 1.0:
            raise ConfigError(f"{where}: betas[{i}]={b!r}: expected a float in [0, 1)")
    if not isinstance(eps, (int, float)) or not eps >= 0.0:
        raise ConfigError(f"{where}: eps={eps!r}: expected a number >= 0")
    if not isinstance(weight_decay, (int, float)) or not weight_decay >= 0.0:
        raise ConfigError(f"{where}: weight_decay={weight_decay!r}: expected a number >= 0")


def _check_master_format(fmt: Any, where: str = "FusedAdamW") -> None:
    if fmt not in _MASTER_FORMATS:
        raise ConfigError(f"{where}: master_format={fmt!r}: expected one of {', '.join(_MASTER_FORMATS)}")


class FusedAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) with a fused one-pass update and fused gradient clipping.

    Args:
        params: parameters or param-group dicts, as for any torch optimizer. Parameters must be
            contiguous fp32, bf16 or fp16 tensors; all parameters of a group on one device.
        lr, betas, eps, weight_decay, amsgrad, maximize: as ``torch.optim.AdamW`` (per group;
            ``lr`` may be a float or a 1-element tensor; torch LR schedulers work).
        max_grad_norm: if set, gradients are clipped to this global L2 norm (over all groups)
            inside the step, exactly like ``torch.nn.utils.clip_grad_norm_`` before the step.
            The pre-clip norm is ``last_grad_norm``; a non-finite norm skips the step for every
            parameter and increments ``skipped_steps``.
        master_weights: keep an fp32-exact master of every bf16/fp16 parameter (per group);
            moments are fp32 for every parameter dtype in any case.
        master_format: how bf16 params keep their master (per group). ``"split"`` (default):
            the bf16 param is the master's high half and an int16 tensor holds the low half,
            2 bytes/param instead of 4 (SmolLM2-135M full fine-tuning: 212 MB less); the master
            and every step's maths are bit-identical to ``"fp32"``, and the bf16 param equals
            round-to-nearest-even of the master except at exact ties (rounded away from zero,
            probability 2^-16 per element and step; :mod:`fastft.ops.adamw`). ``"fp32"``: a
            separate fp32 master, the param rounded from it. fp16 params always get an fp32
            master (fp16 is not the high half of an fp32 number). One behavioural difference:
            a value written into a bf16 param between steps replaces a split master's high half
            (the stored low half stays, so the master moves with it), while an fp32 master
            ignores it and overwrites the param at the next step.
        backend: force ``triton|cuda|cpu|torch`` (default: ``FASTFT_BACKEND`` or auto).

    Sharded parameters (FSDP2 DTensors, ``Shard`` placements): the state tensors are DTensors
    laid out like their parameter (so ``torch.distributed.checkpoint`` saves and reshards them),
    and every step runs the fused kernels on the local shards. Clipping then uses the global
    norm: the squared norms of the local shards are summed over the ranks first (one
    all-reduce of a scalar), never a per-rank norm. Sharded 16-bit parameters with master
    weights are refused (UserError): keep the shards in fp32, their own masters, and let FSDP2's
    ``MixedPrecisionPolicy`` gather 16-bit copies for compute (fastft's trainer does).

    Attributes:
        last_grad_norm (Tensor | None): 0-dim fp32 pre-clip global norm of the last step's grads
            (NaN/inf when that step was skipped; None when ``max_grad_norm`` is None).
        skipped_steps (int): steps skipped because of a non-finite norm or ``found_inf``.
    Raises:
        ConfigError: invalid hyperparameters. UserError: sparse grads, non-contiguous or
            unsupported-dtype params, a group spanning several devices, grad/param mismatch.
    """

    def __init__(self, params, lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 maximize: bool = False, max_grad_norm: float | None = None,
                 master_weights: bool = False, master_format: str = "split",
                 backend: str | None = None) -> None:
        _check_hparams(lr, betas, eps, weight_decay)
        _check_master_format(master_format)
        if max_grad_norm is not None and (not isinstance(max_grad_norm, (int, float))
                                          or not max_grad_norm >= 0):
            raise ConfigError(f"FusedAdamW: max_grad_norm={max_grad_norm!r}: expected a number >= 0 or None")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, maximize=maximize, master_weights=master_weights,
                        master_format=master_format)
        super().__init__(params, defaults)
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.backend = backend
        self.last_grad_norm: Tensor | None = None
        self._skipped: Tensor | None = None
        # (id(param), amsgrad, master_weights, master_format) -> signature of checked state
        self._ready: dict = {}
        self._ptr_cache: dict = {}  # group index -> (param ids, state pointer columns)
        # GradScaler: pass grad_scale / found_inf as attributes instead of unscaling grads.
        self._step_supports_amp_scaling = True

    # -- torch.optim.Optimizer protocol -------------------------------------------------------
    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for k in ("amsgrad", "maximize", "master_weights"):
                group.setdefault(k, self.defaults.get(k, False) if hasattr(self, "defaults") else False)
            # a torch.optim.AdamW state dict has no master_format: the optimizer's own default;
            # one pickled before master_format existed: "fp32", which is what it kept
            group.setdefault("master_format", self.defaults.get("master_format", "fp32")
                             if hasattr(self, "defaults") else "fp32")
        self.__dict__.setdefault("max_grad_norm", None)
        self.__dict__.setdefault("backend", None)
        self.__dict__.setdefault("last_grad_norm", None)
        self.__dict__.setdefault("_skipped", None)
        self.__dict__["_ready"] = {}
        self.__dict__["_ptr_cache"] = {}

    def add_param_group(self, param_group: dict) -> None:
        if isinstance(param_group, dict):
            merged = {**getattr(self, "defaults", {}), **param_group}
            if merged:
                _check_hparams(merged.get("lr", 1e-3), merged.get("betas", (0.9, 0.999)),
                               merged.get("eps", 1e-8), merged.get("weight_decay", 0.0),
                               f"FusedAdamW param group {len(self.param_groups)}")
                _check_master_format(merged.get("master_format", "split"),
                                     f"FusedAdamW param group {len(self.param_groups)}")
        super().add_param_group(param_group)
        self._split_fp32_sources(self.param_groups[-1])

    @staticmethod
    def _split_fp32_sources(group: dict) -> None:
        """Turn the fp32 source values that fastft.train.precision.attach_fp32_sources attached to bf16
        params into split masters now (the param becomes their high half, the low half waits
        on the param for the first step) instead of at the first step. Reading the sources maps
        in the pages of the safetensors file they share, which stay resident until the last of
        them is freed; at the first step that sat on top of the activations: SmolLM2-135M full
        fine-tuning, first-step peak RSS 2905-2926 MB, the later steps 2761-2797 MB."""
        if not (group.get("master_weights") and group.get("master_format") == "split"):
            return
        with torch.no_grad():
            for p in group["params"]:
                init = p.__dict__.get("_fastft_master_init")
                if p.dtype != torch.bfloat16 or init is None or init.shape != p.shape \
                        or init.dtype != torch.float32:
                    continue
                hi, lo = split_master_encode(init.detach().to(p.device))
                p.data.copy_(hi)
                p._fastft_master_lo = lo
                del p.__dict__["_fastft_master_init"]

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a FusedAdamW or torch.optim.AdamW state dict.

        torch's loader casts every floating state tensor to its param's dtype; for bf16/fp16
        params that would round the fp32 moments/masters (and turn a split master's int16
        ``master_lo`` into bf16), so they are re-read from the source. A master in the other
        format than the group's ``master_format`` is converted at the next step (exactly).
        """
        saved_state = state_dict["state"]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            if pid not in saved_state:
                continue
            st = self.state[p]
            for k, v in saved_state[pid].items():
                if k in _MOMENT_KEYS and isinstance(v, Tensor):
                    st[k] = v.detach().to(device=p.device, dtype=torch.float32, copy=True).contiguous()
                elif k == "master_lo" and isinstance(v, Tensor) and v.dtype == torch.int16:
                    st[k] = v.detach().to(device=p.device, copy=True).contiguous()
                elif k == "step":
                    st[k] = torch.tensor(float(v), dtype=torch.float32, device=p.device)

    @property
    def skipped_steps(self) -> int:
        return 0 if self._skipped is None else int(self._skipped)

    def master_weight(self, p: Tensor) -> Tensor | None:
        """The fp32 master of parameter ``p`` (param shape): the stored fp32 master (the tensor
        itself), the decoded split master (a new tensor), or None (fp32 param, no master, or
        no step taken yet)."""
        st = self.state.get(p, {})
        if "master_lo" in st:
            return split_master_decode(p.detach(), st["master_lo"])
        return st.get("master_param")

    # -- the step --------------------------------------------------------------------------------
    def _state_for(self, p: Tensor, group: dict, gi: int, pi: int) -> dict:
        state = self.state[p]
        key = (id(p), group["amsgrad"], group["master_weights"], group["master_format"])
        if self._ready.get(key) == self._signature(state):  # checked, and no tensor replaced since
            return state
        self._ptr_cache.clear()
        if "step" not in state or "exp_avg" not in state or "exp_avg_sq" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
            state.pop("max_exp_avg_sq", None)
        elif state["step"].device != p.device or state["step"].dtype != torch.float32:
            state["step"] = state["step"].to(device=p.device, dtype=torch.float32).reshape(())
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
        self._init_master(p, state, group, f"group {gi} param {pi}")
        for k in _MOMENT_KEYS:  # e.g. loaded from a state dict of another dtype/device
            t = state.get(k)
            if t is not None and (t.dtype != torch.float32 or t.device != p.device
                                  or not t.is_contiguous() or t.shape != p.shape):
                if t.shape != p.shape:
                    raise UserError(f"FusedAdamW: state '{k}' of group {gi} param {pi} has shape "
                                    f"{tuple(t.shape)}, expected {tuple(p.shape)}")
                state[k] = t.to(device=p.device, dtype=torch.float32).contiguous()
        self._ready[key] = self._signature(state)
        return state

    @staticmethod
    def _init_master(p: Tensor, state: dict, group: dict, where: str) -> None:
        """Create or convert the master of ``p`` in ``state`` for the group's settings.

        Sources, first found: a master already in ``state`` (either format: converted exactly),
        the fp32 source values attached by fastft.train.precision.attach_fp32_sources (consumed once;
        already split by :meth:`_split_fp32_sources` for split groups), the param itself. A new
        split master sets the bf16 param to the master's high half."""
        want = group["master_weights"] and p.dtype != torch.float32
        split = want and p.dtype == torch.bfloat16 and group["master_format"] == "split"
        if isinstance(p, DTensor) and want:
            # FSDP2 keeps sharded weights in fp32 and gathers 16-bit copies (MixedPrecisionPolicy):
            # those fp32 shards are their own masters (fastft.train.distributed does this)
            raise UserError(f"FusedAdamW: {where} is a sharded {p.dtype} parameter; master weights of "
                            "sharded 16-bit parameters are not supported: keep the shards in fp32 and let "
                            "FSDP2's MixedPrecisionPolicy(param_dtype=...) gather 16-bit copies")
        init = p.__dict__.pop("_fastft_master_init", None)
        if init is not None and (init.shape != p.shape or init.dtype != torch.float32):
            init = None
        pre_lo = p.__dict__.pop("_fastft_master_lo", None)  # from _split_fp32_sources
        if pre_lo is not None and (pre_lo.shape != p.shape or p.dtype != torch.bfloat16):
            pre_lo = None
        lo, full = state.get("master_lo"), state.get("master_param")
        if lo is not None and lo.dtype != torch.int16:
            raise UserError(f"FusedAdamW: state 'master_lo' of {where} has dtype {lo.dtype}, expected "
                            "torch.int16 (a split-master state dict that went through an optimizer "
                            "which cast it?)")
        for k, t in (("master_lo", lo), ("master_param", full)):
            if t is not None and t.shape != p.shape:
                raise UserError(f"FusedAdamW: state '{k}' of {where} has shape {tuple(t.shape)}, "
                                f"expected {tuple(p.shape)}")
        if not want:
            state.pop("master_lo", None)
            state.pop("master_param", None)
        elif split:
            if lo is None and full is None and pre_lo is not None:
                lo = pre_lo  # the param already is the high half
            if lo is None:
                src = full if full is not None else init
                if src is None:
                    lo = torch.zeros_like(p, dtype=torch.int16, memory_format=torch.contiguous_format)
                else:  # the master is the truth: the param becomes its high half
                    hi, lo = split_master_encode(src.detach().to(device=p.device, dtype=torch.float32))
                    p.data.copy_(hi)
            state["master_lo"] = lo.to(p.device).contiguous()
            state.pop("master_param", None)
        else:
            if full is None:
                if lo is not None:
                    if p.dtype != torch.bfloat16:
                        raise UserError(f"FusedAdamW: {where} has dtype {p.dtype} but its state holds a "
                                        "split master ('master_lo'), which only a bf16 param can have")
                    full = split_master_decode(p.detach(), lo.to(p.device))
                elif pre_lo is not None:
                    full = split_master_decode(p.detach(), pre_lo)
                else:
                    full = init.to(p.device) if init is not None else p.detach().float()
            state["master_param"] = full.contiguous()
            state.pop("master_lo", None)

    @staticmethod
    def _signature(state: dict) -> tuple:
        # ids of the state tensors: a replaced tensor (e.g. someone assigning state["exp_avg"])
        # forces the full dtype/shape/device check and new raw pointers
        return (id(state.get("step")), id(state.get("exp_avg")), id(state.get("exp_avg_sq")),
                id(state.get("max_exp_avg_sq")), id(state.get("master_param")),
                id(state.get("master_lo")))

    def _collect(self) -> list[AdamWGroup]:
        groups = []
        for gi, group in enumerate(self.param_groups):
            params, grads, m, v, vmax, masters, steps = [], [], [], [], [], [], []
            device = None
            for pi, p in enumerate(group["params"]):
                grad = p.grad
                if grad is None:
                    continue
                where = f"group {gi} param {pi} (shape {tuple(p.shape)})"
                if grad.is_sparse:
                    raise UserError(f"FusedAdamW: {where} has a sparse gradient; "
                                    "use torch.optim.SparseAdam for sparse gradients")
                if p.dtype not in _PARAM_DTYPES:
                    raise UserError(f"FusedAdamW: {where} has dtype {p.dtype}; expected fp32, bf16 or fp16")
                if not _local(p).is_contiguous():
                    raise UserError(f"FusedAdamW: {where} is not contiguous (strides {p.stride()}); "
                                    "the fused kernels need contiguous parameters")
                if device is None:
                    device = p.device
                elif p.device != device:
                    raise UserError(f"FusedAdamW: {where} is on {p.device} but group {gi} has "
                                    f"parameters on {device}; put each device in its own group")
                if grad.shape != p.shape or grad.device != p.device:
                    raise UserError(f"FusedAdamW: {where}: gradient has shape {tuple(grad.shape)} on "
                                    f"{grad.device}, expected {tuple(p.shape)} on {p.device}")
                if isinstance(p, DTensor) != isinstance(grad, DTensor) or (
                        isinstance(p, DTensor) and not all(isinstance(pl, Shard) for pl in p.placements)):
                    raise UserError(f"FusedAdamW: {where}: only dim-sharded DTensor parameters with "
                                    "DTensor gradients (FSDP2) are supported")
                grad = _local(grad)
                if grad.dtype not in (p.dtype, torch.float32):
                    grad = grad.to(p.dtype)
                if not grad.is_contiguous():
                    grad = grad.contiguous()  # read-only use: a contiguous copy is exact
                st = self._state_for(p, group, gi, pi)
                params.append(_local(p))
                grads.append(grad)
                m.append(_local(st["exp_avg"]))
                v.append(_local(st["exp_avg_sq"]))
                if group["amsgrad"]:
                    vmax.append(_local(st["max_exp_avg_sq"]))
                masters.append(_local(st["master_lo"] if "master_lo" in st else st.get("master_param")))
                steps.append(st["step"])
                if isinstance(p, DTensor):
                    self._sharded = p
            beta1, beta2 = group["betas"]
            ag = AdamWGroup(params, grads, m, v, vmax, masters, steps, group["lr"], float(beta1),
                            float(beta2), float(group["eps"]), float(group["weight_decay"]),
                            bool(group["amsgrad"]), bool(group["maximize"]))
            if params and params[0].device.type == "cpu":
                # state tensors are updated in place, so their pointers only change when
                # _state_for (re)creates one, which empties this cache
                key = tuple(map(id, params))
                hit = self._ptr_cache.get(gi)
                if hit is None or hit[0] != key:
                    hit = self._ptr_cache[gi] = (key, group_state_ptrs(ag))
                ag.state_ptrs = hit[1]
            groups.append(ag)
        return groups

    def _sharded_step(self, groups: list[AdamWGroup], grad_scale: Tensor | None,
                      found_inf: Tensor | None):
        """Clip to the global norm of sharded grads, then one fused step without clipping.

        The fused kernels see only this rank's shards, so the norm is computed first (one pass
        over the local grads) and summed over the ranks; the clip coefficient
        ``c = min(max_norm / (norm + 1e-6), 1) / grad_scale`` then enters the fused step as its
        gradient multiplier (``grad_scale = 1 / c``), which is the same update the in-kernel
        clip makes. A non-finite global norm skips the step on every rank alike."""
        local = [g for ag in groups for g in ag.grads]
        dev = local[0].device
        sumsq = grad_sumsq(local, self.backend).to(dev)
        sumsq = reduce_sumsq(sumsq, self._sharded)
        inv = 1.0 / grad_scale.to(dev, torch.float64) if grad_scale is not None else 1.0
        norm = sumsq.sqrt() * inv
        coef = torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0) * inv
        skip = ~torch.isfinite(norm)
        if found_inf is not None:
            skip = skip | (found_inf.to(dev) != 0)
        result = fused_adamw(groups, None, 1.0 / coef, skip.float(), self.backend)
        result.norm = norm.float()
        return result

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One clip (if ``max_grad_norm``) + AdamW step over all parameters with a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sharded = None
        groups = self._collect()
        devices = {g.params[0].device for g in groups if g.params}
        if len(devices) > 1:
            # the global clip norm, the skip decision and GradScaler's found_inf couple devices
            raise UserError(f"FusedAdamW: parameters on several devices ({', '.join(sorted(map(str, devices)))}); "
                            "use one FusedAdamW per device")
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        if self._sharded is not None and self.max_grad_norm is not None:
            result = self._sharded_step(groups, grad_scale, found_inf)
        else:
            result = fused_adamw(groups, self.max_grad_norm, grad_scale, found_inf, self.backend)
        self.last_grad_norm = result.norm
        skipped = result.skipped.to(torch.int64)
        self._skipped = skipped if self._skipped is None else self._skipped + skipped.to(self._skipped.device)
        return loss
