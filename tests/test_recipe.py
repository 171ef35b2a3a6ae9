"""fastft.train.Recipe: load once, train many. Two LoRA trials in sequence on one loaded base; the
second equals a fresh process's ``fastft train`` with the same config and seed (losses, grad norms
and the trained adapter, bit for bit), and the base weights are untouched by the first."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastft.config import load_config
from fastft.train import Recipe

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from trainer_helpers import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _args(tiny, run_dir, *extra):
    return ["--model.path", str(tiny), "--output.dir", str(run_dir), "--train.progress", "false",
            "--output.tensorboard", "false", "--train.batch_size", "4", "--train.max_steps", "3",
            "--model.dtype", "fp32", "--train.threads", "1", "--lora.dropout", "0.1", *extra]


TRIAL_A = ("--lora.r", "4", "--lora.alpha", "8", "--train.lr", "1e-3")
TRIAL_B = ("--lora.r", "8", "--lora.alpha", "32", "--lora.target_modules", "q_proj,k_proj,v_proj,o_proj",
           "--train.lr", "3e-3", "--train.seed", "7")


def _train_log(run_dir):
    rows = [json.loads(x) for x in open(Path(run_dir) / "metrics.jsonl")]
    return [(r["loss"], r["grad_norm"]) for r in rows if r["event"] == "train"]


def _adapter(run_dir):
    return load_file(str(Path(run_dir) / "final" / "adapter" / "adapter_model.safetensors"))


def test_load_once_train_two_lora_trials(tiny, tmp_path, one_thread):
    cfg_a = load_config(None, _args(tiny, tmp_path / "a", *TRIAL_A))
    recipe = Recipe(cfg_a, log=lambda s: None)
    model, _ = recipe.load()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    recipe.data()
    recipe.adapt()
    recipe.train(tmp_path / "a")
    cfg_b = load_config(None, _args(tiny, tmp_path / "b", *TRIAL_B))
    recipe.adapt(cfg_b)  # removes trial A's adapters, injects B's from B's seed
    names = {n for n, _ in recipe.model.named_parameters()}
    for n, p in recipe.model.named_parameters():  # the frozen base is the loaded one
        if "lora_" not in n:
            key = n.replace(".base_layer", "")
            assert torch.equal(p, base[key]), n
    assert sum("lora_A" in n for n in names) == 2 * 4  # 2 layers x 4 targets, none left from A
    recipe.train(tmp_path / "b")
    assert recipe.evaluate()["eval_loss"] > 0

    # the same trial in a fresh process
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    code = "import sys; from fastft.train.cli import run; run(None, sys.argv[1:])"
    r = subprocess.run([sys.executable, "-c", code, *_args(tiny, tmp_path / "fresh", *TRIAL_B)],
                       env=env, cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _train_log(tmp_path / "b") == _train_log(tmp_path / "fresh")
    got, want = _adapter(tmp_path / "b"), _adapter(tmp_path / "fresh")
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert _train_log(tmp_path / "a") != _train_log(tmp_path / "b")


def test_full_trial_needs_keep_base(tiny, tmp_path, one_thread):
    """A full fine-tune changes the base: without keep_base a second trial is refused, with it the
    weights come back exactly."""
    from fastft.errors import UserError

    cfg = load_config(None, _args(tiny, tmp_path / "f", "--finetune.mode", "full", "--train.max_steps", "1"))
    recipe = Recipe(cfg, log=lambda s: None)
    recipe.load()
    recipe.adapt()
    recipe.train(tmp_path / "f")
    with pytest.raises(UserError, match="keep_base=True"):
        recipe.adapt()
    kept = Recipe(cfg, log=lambda s: None, keep_base=True)
    model, _ = kept.load()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    kept.adapt()
    kept.train(tmp_path / "g")
    assert any(not torch.equal(p, base[n]) for n, p in kept.model.named_parameters())
    kept.adapt()
    for n, p in kept.model.named_parameters():
        assert torch.equal(p, base[n]), n


def test_trials_do_not_stack_fp32_casts(tiny, tmp_path, one_thread):
    """A bf16 full trial keeps the trainable embedding and norms in fp32 with cast hooks
    (fastft/train/precision.py); reset() removes them with the fp32 copies, so trial after trial the
    model carries one set (they used to pile up, and a later trial that froze the tied embedding
    kept the fp32 head cast)."""
    cfg = load_config(None, _args(tiny, tmp_path / "f", "--finetune.mode", "full", "--model.dtype", "bf16"))
    recipe = Recipe(cfg, log=lambda s: None, keep_base=True)
    recipe.load()
    recipe.adapt()
    emb = recipe.model.get_input_embeddings()
    norm = recipe.model.model.norm
    assert emb.weight.dtype == torch.float32 and len(emb._forward_hooks) == 1 and len(norm._forward_hooks) == 1
    recipe.reset()
    assert emb.weight.dtype == torch.bfloat16 and not emb._forward_hooks and not norm._forward_hooks
    recipe.adapt()
    recipe.adapt()
    assert len(emb._forward_hooks) == 1 and len(norm._forward_hooks) == 1
