"""Where the optimizer's memory comes from (issue 21: full fine-tuning peak RSS).

Adam's moments are 8 bytes per trained parameter (SmolLM2-135M: 1076 MB). The trainer allocates
them before the first forward (``FusedAdamW.init_moments``), not inside the first step after the
activations were freed, where they filled the heap holes that later steps' activations then had
to find elsewhere (benchmarks/README.md). These tests pin the when and the how much - not RSS,
which depends on the allocator and the machine."""
import pytest
import torch

from fastft.optim import FusedAdamW


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # tests/conftest.py
    yield


def _params(dtype):
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(*s, generator=g).to(dtype)) for s in ((7, 5), (13,), (3, 4, 2))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_init_moments_then_steps_equal_lazy_steps(dtype, amsgrad):
    """Eager zero moments change nothing: params, moments and master agree bit for bit after
    three steps (with clipping), and frozen params get no state."""
    runs = []
    for eager in (False, True):
        ps = _params(dtype)
        frozen = torch.nn.Parameter(torch.ones(3), requires_grad=False)
        opt = FusedAdamW(ps + [frozen], lr=1e-2, weight_decay=0.1, amsgrad=amsgrad, max_grad_norm=0.5,
                         master_weights=dtype != torch.float32)
        if eager:
            assert opt.init_moments() == len(ps)
            for p in ps:
                st = opt.state[p]
                assert st["exp_avg"].dtype == torch.float32 and st["exp_avg"].shape == p.shape
                assert not st["exp_avg"].any() and not st["exp_avg_sq"].any() and float(st["step"]) == 0
                assert ("max_exp_avg_sq" in st) == amsgrad
                assert "master_lo" not in st and "master_param" not in st  # the master stays lazy
            assert frozen not in opt.state
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g).to(dtype)
            opt.step()
        runs.append((ps, opt))
    (pa, oa), (pb, ob) = runs
    for a, b in zip(pa, pb):
        assert torch.equal(a, b)
        for k, v in oa.state[a].items():
            assert torch.equal(v, ob.state[b][k]), k
        assert oa.state[a].keys() == ob.state[b].keys()


def test_trainer_allocates_moments_before_the_first_forward(tmp_path):
    """Full fine-tuning: when the first forward runs, every trained parameter already has its
    fp32 moments, 8 bytes per parameter in all."""
    from fastft.config import load_config
    from fastft.train.cli import build
    from fastft.train.trainer import Trainer
    from trainer_helpers import make_tiny_model

    tiny = make_tiny_model(tmp_path / "model")
    cfg = load_config(None, ["--model.path", str(tiny), "--output.dir", str(tmp_path / "run"), "--train.progress",
                             "false", "--output.tensorboard", "false", "--train.batch_size", "4",
                             "--finetune.mode", "full", "--train.max_steps", "1", "--data.val_ratio", "0"])
    model, tok, bundle, dev = build(cfg)
    (tmp_path / "run").mkdir()
    tr = Trainer(cfg, tmp_path / "run", model, tok, bundle, dev, log=lambda s: None)
    trained = [p for p in model.parameters() if p.requires_grad]
    seen = []

    def first_forward(_module, _args):
        if not seen:
            st = tr.optimizer.state
            seen.append(sum(st[p]["exp_avg"].nbytes + st[p]["exp_avg_sq"].nbytes for p in trained if p in st))
    h = model.get_input_embeddings().register_forward_pre_hook(first_forward)  # the loss runs the decoder alone
    try:
        tr.train()
    finally:
        h.remove()
    assert seen == [8 * sum(p.numel() for p in trained)]
