"""FusedAdamW on FSDP2-style sharded parameters (DTensor, ``Shard(0)``): the fused kernels step
the local shards and clipping uses the global norm, with the same result as plain parameters,
on every backend. One-process gloo group (world size 1: the shard is the whole tensor, so the
numbers must match the unsharded step; the 2-rank case is tests/test_distributed.py)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from fastft.errors import UserError
from fastft.optim import FusedAdamW

SHAPES = [(7, 5), (13,), (3, 4, 5), (1, 9)]
BACKENDS = ["torch", "cpu", "triton"]


@pytest.fixture(scope="module")
def mesh():
    from torch.distributed.device_mesh import init_device_mesh

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    yield init_device_mesh("cpu", (1,))
    if started:
        dist.destroy_process_group()


def _pair(mesh, seed: int = 0):
    from torch.distributed.tensor import Shard, distribute_tensor

    g = torch.Generator().manual_seed(seed)
    plain = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]
    sharded = [torch.nn.Parameter(distribute_tensor(p.detach().clone(), mesh, [Shard(0)])) for p in plain]
    return plain, sharded


def _grads(plain, sharded, step: int, scale: float = 1.0):
    from torch.distributed.tensor import Shard, distribute_tensor

    g = torch.Generator().manual_seed(100 + step)
    for p, q in zip(plain, sharded):
        gr = torch.randn(p.shape, generator=g) * scale
        p.grad = gr.clone()
        q.grad = distribute_tensor(gr.clone(), q.device_mesh, [Shard(0)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("max_norm", [None, 0.5])
def test_sharded_step_equals_plain(mesh, backend, max_norm):
    plain, sharded = _pair(mesh)
    kw = dict(lr=1e-2, weight_decay=0.1, max_grad_norm=max_norm, backend=backend)
    a, b = FusedAdamW(plain, **kw), FusedAdamW(sharded, **kw)
    for step in range(3):
        _grads(plain, sharded, step)
        a.step()
        b.step()
        if max_norm is not None:  # clipping binds: the norms are ~7
            assert float(a.last_grad_norm) > 5 * max_norm
            torch.testing.assert_close(b.last_grad_norm, a.last_grad_norm, rtol=1e-6, atol=0)
    for p, q in zip(plain, sharded):
        torch.testing.assert_close(q.to_local(), p.detach(), rtol=1e-6, atol=1e-7)
    st = b.state[sharded[0]]
    from torch.distributed.tensor import DTensor

    assert isinstance(st["exp_avg"], DTensor) and st["exp_avg"].placements == sharded[0].placements


def test_nonfinite_global_norm_skips_the_step(mesh):
    plain, sharded = _pair(mesh)
    before = [q.to_local().clone() for q in sharded]
    opt = FusedAdamW(sharded, lr=1e-2, max_grad_norm=1.0, backend="cpu")
    _grads(plain, sharded, 0)
    sharded[1].grad.to_local()[3] = float("inf")
    opt.step()
    assert opt.skipped_steps == 1 and not torch.isfinite(opt.last_grad_norm)
    for q, b in zip(sharded, before):
        assert torch.equal(q.to_local(), b)


def test_sharded_16bit_params_with_masters_are_refused(mesh):
    from torch.distributed.tensor import Shard, distribute_tensor

    p = torch.nn.Parameter(distribute_tensor(torch.randn(6, 4).bfloat16(), mesh, [Shard(0)]))
    p.grad = distribute_tensor(torch.randn(6, 4).bfloat16(), mesh, [Shard(0)])
    with pytest.raises(UserError, match="master weights of sharded 16-bit parameters"):
        FusedAdamW([p], lr=1e-3, master_weights=True).step()
