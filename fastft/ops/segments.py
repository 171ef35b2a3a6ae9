"""Which keys each query of a packed (variable-length) batch may see: the sample layout of a row.

A packed row of T tokens holds several samples back to back, optionally followed by a pad tail;
a query attends only to earlier keys of its own sample. :class:`Segments` describes that layout
per token with two (B, T) int32 tensors, O(B T) memory (no T x T mask is ever built)::

    start[b, i] = first token of i's sample        (query i sees keys start[b, i] .. i)
    end[b, i]   = one past the last token of i's sample

Rows are cut into samples (contiguous, in order) by any of three descriptions:

* ``cu_seqlens``: FlashAttention's varlen convention, (N + 1,) int cumulative sample lengths over
  the B * T tokens of the flattened batch (0, ..., B * T); every row boundary (a multiple of T)
  must be one of them, so no sample crosses rows. A pad tail is one more "sample".
* ``position_ids``: (B, T) ints; a sample starts at t = 0 and wherever the position is 0 (the
  convention of :func:`fastft.data.packing.pack_examples` and of Hugging Face's
  ``DataCollatorWithFlattening``). With an ``attention_mask`` (B, T) 0/1, a change of the mask
  starts a sample too, so a pad tail (or left padding) is a sample of its own and no real token
  sees a pad.
* ``segment_ids``: (B, T) ints; a sample starts wherever the id changes.

Kernels read ``start`` to mask and to skip key tiles before a query tile's first sample, and
``end`` to bound a key tile's queries in the backward. :meth:`Segments.cu_seqlens` gives the
flattened varlen form for FlashAttention-style routes.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["Segments", "block_causal_mask", "sample_ids", "segments_from_cu_seqlens", "segments_from_ids",
           "segments_from_position_ids"]


class Segments:
    """The sample layout of a (B, T) batch of rows (see the module docstring).

    Attributes:
        start: (B, T) int32 contiguous, first token of each token's sample.
        end: (B, T) int32 contiguous, one past the last token of each token's sample.
    """

    __slots__ = ("start", "end", "_cu")

    def __init__(self, start: Tensor, end: Tensor, _checked: bool = False):
        """Takes (B, T) int32 ``start``/``end`` tables; checks they describe contiguous samples in
        order (the GPU kernels index keys from them), unless built by this module's builders."""
        self.start, self.end = start, end
        self._cu = None
        if not _checked:
            self._check()

    def _check(self) -> None:
        s, e = self.start, self.end
        if (s.dim() != 2 or s.shape != e.shape or s.dtype != torch.int32 or e.dtype != torch.int32
                or not s.is_contiguous() or not e.is_contiguous() or s.device != e.device):
            raise ValueError(f"Segments: start {tuple(s.shape)} {s.dtype}, end {tuple(e.shape)} {e.dtype}: expected "
                             "two contiguous (B, T) int32 tensors on one device")
        if s.numel() == 0:
            return
        T = s.shape[1]
        i = torch.arange(T, device=s.device, dtype=torch.int32)
        new = s == i
        prev = torch.cat([s[:, :1], s[:, :-1]], 1)
        # a sample starts at i (start == i) or continues the previous token's; ends match the starts
        ok = (new | (s == prev)) & new[:, 0:1] & (e > i) & (e <= T)
        expect = Segments.from_boundaries(new).end
        if not bool(ok.all()) or not torch.equal(expect, e):
            raise ValueError("Segments: start/end do not describe contiguous samples in order (build them with "
                             "segments_from_cu_seqlens / segments_from_position_ids / segments_from_ids)")

    @classmethod
    def from_boundaries(cls, new: Tensor) -> "Segments":
        """From a (B, T) bool tensor that is True where a sample starts (column 0 is forced True)."""
        if new.dim() != 2:
            raise ValueError(f"segments: boundaries {tuple(new.shape)}: expected (B, T)")
        B, T = new.shape
        new = new.clone()
        if T:
            new[:, 0] = True
        idx = torch.arange(T, device=new.device, dtype=torch.int32).expand(B, T)
        zero = torch.zeros((), dtype=torch.int32, device=new.device)
        start = torch.where(new, idx, zero).cummax(dim=1).values if T else idx.clone()
        # end[i] = the first boundary after i (T when none): a reversed running minimum
        nxt = torch.cat([new[:, 1:], torch.ones(B, min(T, 1), dtype=torch.bool, device=new.device)], 1)
        cand = torch.where(nxt, idx + 1, torch.full((), T, dtype=torch.int32, device=new.device))
        end = cand.flip(1).cummin(dim=1).values.flip(1) if T else idx.clone()
        return cls(start.to(torch.int32).contiguous(), end.to(torch.int32).contiguous(), _checked=True)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.start.shape)

    def to(self, device) -> "Segments":
        if self.start.device == torch.device(device):
            return self
        return Segments(self.start.to(device), self.end.to(device), _checked=True)

    def is_causal(self) -> bool:
        """True when every row is one sample (plain causal attention)."""
        return bool((self.start == 0).all())

    def cu_seqlens(self) -> tuple[Tensor, int]:
        """(cu_seqlens (N + 1,) int32 over the flattened B * T tokens, longest sample length);
        computed once (one host sync) and cached."""
        if self._cu is None:
            B, T = self.shape
            flat = self.start.reshape(-1).long() + torch.arange(B, device=self.start.device).repeat_interleave(T) * T
            first = flat == torch.arange(B * T, device=flat.device)
            cu = torch.cat([first.nonzero().flatten(), torch.tensor([B * T], device=flat.device)]).to(torch.int32)
            longest = int((cu[1:] - cu[:-1]).max().item()) if B * T else 0
            self._cu = (cu, longest)
        return self._cu

    def n_samples(self) -> int:
        """Number of samples (pad tails count as one) over the batch."""
        return int((self.start == torch.arange(self.shape[1], device=self.start.device)).sum().item())


def segments_from_cu_seqlens(cu_seqlens: Tensor, batch: int, seqlen: int) -> Segments:
    """Segments of a (batch, seqlen) layout from FlashAttention-style cumulative lengths.

    Args:
        cu_seqlens: (N + 1,) int, 0 = c_0 < c_1 < ... < c_N = batch * seqlen, containing every
            multiple of ``seqlen`` (no sample crosses a row).
    Raises:
        ValueError: any of the above does not hold.
    """
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens {tuple(cu_seqlens.shape)} {cu_seqlens.dtype}: expected a 1-D int tensor")
    c = cu_seqlens.long()
    n = batch * seqlen
    if int(c[0]) != 0 or int(c[-1]) != n or bool((c[1:] <= c[:-1]).any()):
        raise ValueError(f"cu_seqlens: expected strictly increasing from 0 to B*T={n}, got "
                         f"{c[:6].tolist()}{'...' if c.numel() > 6 else ''} ending at {int(c[-1])}")
    new = torch.zeros(n + 1, dtype=torch.bool, device=c.device)
    new[c] = True
    if seqlen and not bool(new[::seqlen].all()):
        raise ValueError(f"cu_seqlens: a sample crosses a row boundary (every multiple of T={seqlen} must be listed)")
    return Segments.from_boundaries(new[:n].view(batch, seqlen))


def segments_from_position_ids(position_ids: Tensor, attention_mask: Tensor | None = None) -> Segments:
    """Segments of packed rows from per-token positions (a sample starts where the position is 0)
    and, optionally, a (B, T) 0/1 padding mask (a change of the mask starts a sample).

    Args:
        position_ids: (B, T) or (1, T) ints.
        attention_mask: (B, T) 0/1 or None.
    """
    if position_ids.dim() != 2 or position_ids.dtype.is_floating_point:
        raise ValueError(f"position_ids {tuple(position_ids.shape)} {position_ids.dtype}: expected (B, T) ints")
    new = position_ids == 0
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[-1] != position_ids.shape[-1]:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)}: expected (B, T) next to position_ids "
                             f"{tuple(position_ids.shape)}")
        m = attention_mask.to(torch.bool)
        new = new.expand(m.shape[0], -1) | torch.cat([torch.ones_like(m[:, :1]), m[:, 1:] != m[:, :-1]], 1)
    return Segments.from_boundaries(new)


def segments_from_ids(segment_ids: Tensor) -> Segments:
    """Segments from (B, T) int sample ids: a sample starts wherever the id changes."""
    if segment_ids.dim() != 2 or segment_ids.dtype.is_floating_point:
        raise ValueError(f"segment_ids {tuple(segment_ids.shape)} {segment_ids.dtype}: expected (B, T) ints")
    s = segment_ids
    return Segments.from_boundaries(torch.cat([torch.ones_like(s[:, :1], dtype=torch.bool), s[:, 1:] != s[:, :-1]], 1))


def sample_ids(position_ids: Tensor) -> Tensor:
    """Index of the sample each token belongs to: a new sample starts where position_ids is 0.

    Args:
        position_ids: ``(B, T)`` int64.

    Returns:
        ``(B, T)`` int64, e.g. positions ``[0,1,2,0,1,0]`` -> ``[1,1,1,2,2,3]``.
    """
    return (position_ids == 0).long().cumsum(-1)


def block_causal_mask(position_ids: Tensor, attention_mask: Tensor | None,
                      dtype: torch.dtype = torch.float32) -> Tensor:
    """4-D additive mask: token q attends to k iff k <= q, same sample, and k is not padding.

    Args:
        position_ids: ``(B, T)`` int64, restarting at 0 per packed sample.
        attention_mask: ``(B, T)`` 0/1 padding mask or None.

    Returns:
        ``(B, 1, T, T)`` tensor of ``dtype``: 0 where allowed, ``finfo(dtype).min`` elsewhere.
        A padding query still sees itself (position 0 starts its own sample), so no row is all
        masked and softmax never produces NaN.
    """
    B, T = position_ids.shape
    sid = sample_ids(position_ids)
    same = sid[:, :, None] == sid[:, None, :]  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=position_ids.device).tril()
    allowed = same & causal
    if attention_mask is not None:
        keep = attention_mask.bool()
        allowed = allowed & keep[:, None, :] | torch.eye(T, dtype=torch.bool, device=position_ids.device)
    mask = torch.zeros(B, 1, T, T, dtype=dtype, device=position_ids.device)
    return mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
