"""fastft/train/precision.py: in full/partial bf16 runs the trainable embedding (tied head) and RMSNorm
weights are fp32, matmul weights bf16, the residual stream bf16, and a weight update below bf16
resolution reaches the loss (with all-bf16 weights it did not: the full-mode loss drift vs HF in
benchmarks/README.md)."""
from __future__ import annotations

import shutil

import pytest
import torch

from fastft.config import load_config
from fastft.train.cli import build, run
from fastft.train.utils import CausalLMLoss
from trainer_helpers import make_tiny_model


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # tests/conftest.py: tiny models run on one thread
    yield


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """The tiny random Llama of the trainer tests, with tied embeddings (as SmolLM2)."""
    from transformers import AutoConfig, LlamaForCausalLM

    src = make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
    out = tmp_path_factory.mktemp("tied") / "model"
    shutil.copytree(src, out)
    cfg = AutoConfig.from_pretrained(out)
    cfg.tie_word_embeddings = True
    torch.manual_seed(1)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def _build(tied, tmp_path, *extra):
    cfg = load_config(None, ["--model.path", str(tied), "--output.dir", str(tmp_path / "run"),
                             "--train.progress", "false", "--output.tensorboard", "false",
                             "--model.dtype", "bf16", "--model.dropout", "0", *extra])
    model, tok, bundle, _ = build(cfg)
    return model, tok


def _norms(model):
    return [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]


def _matmul_weights(model):
    return {n: p for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n and "lm_head" not in n}


@pytest.mark.parametrize("fused_blocks", [True, False])
def test_full_bf16_keeps_embedding_and_norms_fp32(tied, tmp_path, fused_blocks):
    model, tok = _build(tied, tmp_path, "--finetune.mode", "full", "--model.fused_blocks", str(fused_blocks).lower())
    emb = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is emb  # tied
    assert emb.dtype == torch.float32
    norms = _norms(model)
    assert len(norms) == 2 * 2 + 1 and all(m.weight.dtype == torch.float32 for m in norms)
    mm = _matmul_weights(model)
    assert mm and all(p.dtype == torch.bfloat16 for p in mm.values())

    ids = torch.randint(4, len(tok), (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # HF's own forward (eval/generation paths): bf16 stream, fp32 logits
        out = model(input_ids=ids, output_hidden_states=True)
    assert all(h.dtype == torch.bfloat16 for h in out.hidden_states)
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.logits).all()

    loss_fn = CausalLMLoss(model)
    labels = ids.clone()
    mask = torch.ones_like(ids)

    def loss():
        with torch.no_grad():
            return loss_fn(ids, mask, labels)[0].item()

    base = loss()
    w = model.model.norm.weight  # ones at init: bf16 spacing at 1.0 is 2^-7 = 7.8e-3
    delta = 2e-3
    assert torch.equal((w.detach() + delta).bfloat16(), w.detach().bfloat16())  # invisible in bf16
    with torch.no_grad():
        w.add_(delta)
    assert loss() != base  # the fp32 weight carries the update into the loss
    with torch.no_grad():
        w.sub_(delta)
        emb.add_(1e-4 * torch.randn_like(emb))  # below bf16 resolution of most entries
    assert loss() != base

    loss_fn(ids, mask, labels)[0].backward()
    assert emb.grad.dtype == torch.float32 and w.grad.dtype == torch.float32


def test_lora_and_frozen_parts_stay_bf16(tied, tmp_path):
    model, _ = _build(tied, tmp_path / "a", "--finetune.mode", "lora", "--lora.target_modules", "q_proj,v_proj")
    floats = [p for p in model.parameters() if p.is_floating_point() and not p.requires_grad]
    assert floats and all(p.dtype == torch.bfloat16 for p in floats)
    # partial: frozen embeddings and the frozen layer's norms stay bf16, trainable norms go fp32
    model, _ = _build(tied, tmp_path / "b", "--finetune.mode", "partial", "--finetune.freeze_embeddings", "true",
                      "--finetune.freeze_layers", "1")
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    for name, p in model.named_parameters():
        if "norm" in name:
            assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), name
    # progressive unfreezing: frozen now, trains later -> fp32 from the start
    model, _ = _build(tied, tmp_path / "c", "--finetune.mode", "partial", "--finetune.freeze_embeddings", "true",
                      "--finetune.unfreeze_after_steps", "5")
    assert not model.get_input_embeddings().weight.requires_grad
    assert model.get_input_embeddings().weight.dtype == torch.float32


def test_full_bf16_trains_and_saved_folder_loads(tied, tmp_path):
    from transformers import AutoModelForCausalLM

    s = run(None, ["--model.path", str(tied), "--output.dir", str(tmp_path / "r"), "--train.progress", "false",
                   "--output.tensorboard", "false", "--model.dtype", "bf16", "--finetune.mode", "full",
                   "--train.max_steps", "3", "--train.batch_size", "4", "--train.lr", "1e-3"])
    assert s["steps"] == 3
    folder = tmp_path / "r" / "final" / "model"
    m = AutoModelForCausalLM.from_pretrained(folder)
    assert m.dtype == torch.bfloat16  # still declared a bf16 model (fastft.train.precision.record_run_dtype)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.isfinite(m(input_ids=ids).logits).all()
    # the file holds the fp32 embedding: the trained values are off the bf16 grid
    emb = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).get_input_embeddings().weight
    assert not torch.equal(emb, emb.bfloat16().float())


def test_fp32_values_come_from_the_source_not_the_bf16_params(tied, tmp_path):
    """Embeddings/norms and the optimizer's masters start from the fp32 file, off the bf16 grid
    (with masters copied from bf16 params no bf16 weight moved until its master drifted half an
    ulp: the full-mode loss drift vs HF, benchmarks/README.md)."""
    from safetensors.torch import load_file

    from fastft.optim import FusedAdamW

    src = {}
    for f in tied.glob("*.safetensors"):
        src.update(load_file(str(f)))
    model, _ = _build(tied, tmp_path, "--finetune.mode", "full")
    emb = model.get_input_embeddings().weight
    assert torch.equal(emb.detach(), src["model.embed_tokens.weight"])
    assert not torch.equal(emb.detach(), emb.detach().bfloat16().float())  # really off the grid
    name = "model.layers.0.self_attn.q_proj.weight"
    p = dict(model.named_parameters())[name]
    assert p.dtype == torch.bfloat16 and torch.equal(p._fastft_master_init, src[name])
    rounded = p.detach().clone()
    opt = FusedAdamW([p], lr=0.0, master_weights=True)  # default: split master (bf16 = high half)
    p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(opt.master_weight(p), src[name])
    ties = (src[name].view(torch.int32) & 0xFFFF) == 0x8000  # rounded away from zero by the split
    assert torch.equal(p.detach()[~ties], rounded[~ties])
    assert "_fastft_master_init" not in p.__dict__  # consumed: no second fp32 copy kept
