"""Selective recompute: drop cheap activations from the autograd graph and rebuild them in backward.

Some activations are pure functions of tensors the graph keeps anyway. The Llama-family block has
three per layer: the two RMSNorm outputs (the fused norm saves its input x and weight; q/k/v and
gate/up save the output again for their weight gradients) and the SwiGLU output (the fused op
saves gate and up; down_proj saves ``silu(gate) * up`` again). SmolLM2-135M, bf16, batch 4x256,
full fine-tuning: 30 x (2 x 1.125 + 3) MiB = 157.5 MiB of the 497.5 MiB the graph keeps after a
forward (benchmarks/bench_recompute.py).

How:

* the op that makes such an output calls :func:`register` ``(out, fn, *args)`` right after
  computing it (``fastft/models/hf_fast.py`` does for the fused ``rms_norm`` and ``swiglu``). The
  registry holds ``out`` weakly (an entry dies with the tensor) and keys it by its storage;
* :class:`recompute_cheap` is a ``saved_tensors_hooks`` context. Its pack hook replaces a saved
  tensor that is (a view of) a registered output by a small handle (the recipe plus the view's
  size/stride/offset); everything else passes through untouched. The unpack hook reruns
  ``fn(*args)`` under ``no_grad`` (same kernel, same inputs: bitwise the same values) and
  returns exactly the saved view with ``as_strided``. Several consumers of one output (q, k, v)
  share one recomputation: it is kept until the last of them has unpacked it.

Contract for :func:`register`: ``fn(*args)`` must return a contiguous tensor like ``out``
(same shape, dtype, device) with bitwise the same values, and the tensors in ``args`` must be
ones the producing op saves for its own backward anyway, so the handle holds no new memory.

Safety rules:

* a registered tensor modified in place before it is saved (its version counter moved) is
  passed through, not recomputed; recipe inputs modified in place before backward raise, as
  autograd does for a modified saved tensor;
* nesting: only the innermost ``saved_tensors_hooks`` pair acts. Inside a
  ``torch.utils.checkpoint`` region (or any other hooks entered after ours) the checkpoint's
  hooks see the saves and nothing is registered; entered while other hooks are already
  active (e.g. inside a checkpointed function, or during its recompute), this context does
  nothing, so checkpointing keeps full control of its region;
* with grad disabled nothing is saved, so nothing happens (eval is a no-op);
* ``backward(create_graph=True)``: the recomputation runs with grad (not cached), so higher-order
  gradients flow through it.
"""
from __future__ import annotations

import contextvars
import weakref

import torch
from torch import Tensor

__all__ = ["recompute_cheap", "register", "active"]

_CURRENT: contextvars.ContextVar["recompute_cheap | None"] = contextvars.ContextVar(
    "fastft_recompute_cheap", default=None)


class _Recipe:
    """How to rebuild one registered output; shared by every handle that saved (a view of) it."""

    __slots__ = ("fn", "args", "arg_versions", "shape", "dtype", "device", "n_packed", "n_unpacked",
                 "cached", "__weakref__")

    def __init__(self, out: Tensor, fn, args: tuple):
        self.fn, self.args = fn, args
        self.arg_versions = tuple(a._version if isinstance(a, Tensor) else None for a in args)
        self.shape, self.dtype, self.device = out.shape, out.dtype, out.device
        self.n_packed = 0      # handles created by pack
        self.n_unpacked = 0    # unpacks since the last recomputation was released
        self.cached: Tensor | None = None

    def _run(self) -> Tensor:
        for a, v in zip(self.args, self.arg_versions):
            if v is not None and a._version != v:
                raise RuntimeError(
                    f"fastft.models.recompute: an input of {getattr(self.fn, '__name__', self.fn)!r} "
                    f"(shape {tuple(a.shape)}) was modified in place after the forward (version {v} -> "
                    f"{a._version}); its output cannot be recomputed for backward")
        y = self.fn(*self.args)
        if y.shape != self.shape or y.dtype != self.dtype or y.device != self.device or not y.is_contiguous():
            raise RuntimeError(
                f"fastft.models.recompute: {getattr(self.fn, '__name__', self.fn)!r} recomputed a "
                f"{tuple(y.shape)} {y.dtype} tensor (contiguous={y.is_contiguous()}), expected a "
                f"contiguous {tuple(self.shape)} {self.dtype} one like the registered output")
        return y

    def value(self) -> Tensor:
        """The recomputed output (contiguous, storage offset 0 relative to ``y``'s own)."""
        if torch.is_grad_enabled():  # backward(create_graph=True): keep the graph, no sharing
            return self._run()
        y = self.cached
        if y is None:
            y = self._run()
        self.n_unpacked += 1
        # keep it for the other handles until each has unpacked once (q, k and v unpack one after
        # the other); then release it, and start counting again for a retain_graph backward
        if self.n_unpacked >= self.n_packed:
            self.cached, self.n_unpacked = None, 0
        else:
            self.cached = y
        return y


class _Handle:
    """What the graph stores in place of a saved view of a registered output."""

    __slots__ = ("recipe", "size", "stride", "offset")

    def __init__(self, recipe: _Recipe, t: Tensor):
        self.recipe, self.size, self.stride, self.offset = recipe, t.size(), t.stride(), t.storage_offset()


class _Entry:
    __slots__ = ("recipe", "version", "finalizer")


class recompute_cheap:
    """Context manager: while active (and grad enabled), saved views of registered outputs are
    recomputed in backward instead of kept. Re-entrant use inside itself or inside other saved-
    tensor hooks is a no-op (see the module docstring)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._entries: dict[tuple, _Entry] = {}  # (device, storage data_ptr) -> entry
        self._hooks = None
        self._token = None
        self._pack_fn = self._pack  # one bound-method object, to recognise our hooks on the stack

    # -------------------------------------------------------------- context
    def __enter__(self):
        if (self.enabled and torch._C._autograd._saved_tensors_hooks_is_enabled()
                and torch._C._autograd._top_saved_tensors_default_hooks(False) is None):
            self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack_fn, self._unpack)
            self._hooks.__enter__()
            self._token = _CURRENT.set(self)
        return self

    def __exit__(self, *exc):
        if self._hooks is not None:
            _CURRENT.reset(self._token)
            self._hooks.__exit__(*exc)
            self._hooks = self._token = None
            for e in self._entries.values():
                e.finalizer.detach()
            self._entries.clear()
        return False

    def _is_top(self) -> bool:
        top = torch._C._autograd._top_saved_tensors_default_hooks(False)
        return top is not None and top[0] is self._pack_fn

    # -------------------------------------------------------------- registry
    def _register(self, out: Tensor, fn, args: tuple) -> bool:
        st = out.untyped_storage()
        # the handle rebuilds views by element offset into a fresh contiguous tensor: only an
        # output that is exactly its own storage (offset 0, contiguous, no spare bytes) maps 1:1
        if (type(out) is not torch.Tensor or out.layout is not torch.strided or out.numel() == 0
                or not out.is_contiguous() or out.storage_offset() != 0
                or st.nbytes() != out.numel() * out.element_size() or not self._is_top()):
            return False
        key = (out.device, st.data_ptr())
        old = self._entries.get(key)
        if old is not None:
            old.finalizer.detach()
        e = _Entry()
        e.recipe, e.version = _Recipe(out, fn, args), out._version
        e.finalizer = weakref.finalize(out, self._forget, key, e)
        self._entries[key] = e
        return True

    def _forget(self, key: tuple, e: _Entry) -> None:
        if self._entries.get(key) is e:
            del self._entries[key]

    # -------------------------------------------------------------- hooks
    def _pack(self, t: Tensor):
        if self._entries and type(t) is torch.Tensor and t.layout is torch.strided:
            e = self._entries.get((t.device, t.untyped_storage().data_ptr()))
            # views share the base's version counter: a moved version means an in-place write
            if e is not None and t._version == e.version and t.dtype == e.recipe.dtype:
                e.recipe.n_packed += 1
                return _Handle(e.recipe, t)
        return t

    @staticmethod
    def _unpack(h):
        if type(h) is not _Handle:
            return h
        y = h.recipe.value()
        return y.as_strided(h.size, h.stride, y.storage_offset() + h.offset)


def register(out: Tensor, fn, *args) -> bool:
    """Declare ``out`` recomputable as ``fn(*args)`` for the active :class:`recompute_cheap`.

    Args:
        out: the op's freshly made output (any shape/dtype), exactly its own storage.
        fn, args: the recipe; ``fn(*args)`` must give ``out`` bitwise (same kernel, same inputs),
            and the tensor args must be ones the producing op saves for backward anyway.
    Returns:
        True when registered; False (nothing happens) outside an active context, inside another
        saved-tensor-hooks region (e.g. a checkpointed layer), or for an unsupported layout.
    """
    ctx = _CURRENT.get()
    if ctx is None or not torch.is_grad_enabled():
        return False
    return ctx._register(out, fn, args)


def active() -> bool:
    """True inside an active :class:`recompute_cheap` with grad enabled (callers can skip work)."""
    return _CURRENT.get() is not None and torch.is_grad_enabled()
