"""fastft.models.lora vs PEFT: LoRALinear vs PEFT's LoRA layer on the same weights (outputs and grads),
inject_lora / quantize_model_int8 on a tiny random Llama, PEFT-format round trips in both
directions (incl. a trained classification head as modules_to_save), merge, bad input, and a
short int8-base training run."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from fastft.errors import ConfigError, UserError
from fastft.models.lora import (Int8Linear, LoRALinear, inject_lora, load_adapter, merge_lora, quantize_model_int8,
                         save_adapter)


def _llama(seq_cls=False, hidden=64, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    cfg = LlamaConfig(vocab_size=120, hidden_size=hidden, intermediate_size=2 * hidden + 48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, num_labels=3)
    torch.manual_seed(seed)
    return (LlamaForSequenceClassification if seq_cls else LlamaForCausalLM)(cfg).eval()


def _randomize_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


IDS = torch.tensor([[5, 17, 33, 2, 90, 11, 7], [3, 4, 99, 100, 8, 1, 6]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("rslora", [False, True])
def test_lora_linear_matches_peft_layer(dtype, int8, rslora):
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    lin = nn.Linear(67, 131, bias=True)
    mine_base = Int8Linear.from_linear(lin) if int8 else copy.deepcopy(lin).to(dtype)
    if int8:
        mine_base.dtype = dtype
        peft_lin = mine_base.dequantized()  # PEFT on the dequantised weight: the same function
    else:
        peft_lin = copy.deepcopy(lin).to(dtype)
    holder = nn.Sequential()
    holder.add_module("lin", peft_lin)
    holder = inject_adapter_in_model(LoraConfig(r=16, lora_alpha=8, target_modules=["lin"], init_lora_weights=False,
                                                use_rslora=rslora), holder)
    holder.to(dtype)
    peft_layer = holder.lin
    mine = LoRALinear(mine_base, r=16, alpha=8, use_rslora=rslora)
    assert mine.scaling == peft_layer.scaling["default"]
    with torch.no_grad():
        mine.lora_A.weight.copy_(peft_layer.lora_A["default"].weight)
        mine.lora_B.weight.copy_(peft_layer.lora_B["default"].weight)
    x = torch.randn(3, 37, 67, dtype=dtype)
    dy = torch.randn(3, 37, 131, dtype=dtype)
    outs = []
    for layer in (mine, peft_layer):
        xx = x.clone().requires_grad_(True)
        y = layer(xx)
        y.backward(dy)
        a = layer.lora_A.weight if layer is mine else layer.lora_A["default"].weight
        b = layer.lora_B.weight if layer is mine else layer.lora_B["default"].weight
        outs.append([y.detach(), xx.grad, a.grad, b.grad])
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for n, a, b in zip(["y", "dx", "dA", "dB"], *outs):
        torch.testing.assert_close(a, b, **tol, msg=n)
    assert not any(p.requires_grad for p in mine.base_layer.parameters())


def test_inject_lora_on_tiny_llama_matches_peft_targets(capsys):
    from peft import LoraConfig, get_peft_model

    base = _llama()
    ref = base(IDS).logits
    for targets in (["q_proj", "v_proj"], r".*\.mlp\.(up|down)_proj", "all-linear"):
        m = inject_lora(copy.deepcopy(base), targets, r=4, alpha=8)
        line = capsys.readouterr().out
        p = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
        mine = sorted(n for n, x in m.named_modules() if isinstance(x, LoRALinear))
        theirs = sorted(n.removeprefix("base_model.model.") for n, x in p.named_modules()
                        if hasattr(x, "lora_A") and isinstance(getattr(x, "base_layer", None), nn.Linear))
        assert mine == theirs and mine, targets
        trainable = sum(x.numel() for x in m.parameters() if x.requires_grad)
        assert trainable == sum(x.numel() for x in p.parameters() if x.requires_grad)
        assert f"trainable params: {trainable:,d} || all params:" in line and "trainable%:" in line
        assert all("lora_" in n for n, x in m.named_parameters() if x.requires_grad)
        torch.testing.assert_close(m(IDS).logits, ref)  # B = 0 at init
    assert "lm_head" not in " ".join(mine)


def test_int8_model_weight_memory_and_outputs(capsys):
    base = _llama(hidden=128)
    ref = base(IDS).logits
    m = quantize_model_int8(copy.deepcopy(base))
    assert "MiB of linear weights" in capsys.readouterr().out
    q = {n: x for n, x in m.named_modules() if isinstance(x, Int8Linear)}
    assert len(q) == 2 * 7 and type(m.lm_head) is nn.Linear and type(m.model.embed_tokens) is nn.Embedding
    fp32 = sum(base.get_submodule(n).weight.numel() * 4 for n in q)
    int8 = sum(x.weight_int8().nbytes() for x in q.values())
    assert int8 <= 0.3 * fp32, int8 / fp32
    # norms, embeddings, lm_head untouched
    for n, p in m.named_parameters():
        assert torch.equal(p, base.get_parameter(n)), n
    err = (m(IDS).logits - ref).norm() / ref.norm()
    assert err < 0.02, err
    inject_lora(m, ["q_proj", "o_proj", "down_proj"], r=4, alpha=8, verbose=False)
    assert isinstance(m.model.layers[0].self_attn.q_proj.base_layer, Int8Linear)


def test_fastft_adapter_loads_in_peft_and_back(tmp_path):
    from peft import PeftModel

    base = _llama()
    m = inject_lora(copy.deepcopy(base), ["q_proj", "v_proj", "down_proj"], r=4, alpha=16, dropout=0.1, verbose=False)
    _randomize_lora(m)
    mine = m(IDS).logits
    save_adapter(m, str(tmp_path / "a"))
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == 4
    peft = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a")).eval()
    theirs = peft(IDS).logits
    assert (mine - base(IDS).logits).abs().max() > 1e-3
    torch.testing.assert_close(theirs, mine, rtol=1e-5, atol=1e-5)
    fresh = load_adapter(copy.deepcopy(base), str(tmp_path / "a"))  # injects from the config
    torch.testing.assert_close(fresh.eval()(IDS).logits, mine, rtol=0, atol=0)


def test_peft_adapter_loads_in_fastft(tmp_path):
    from peft import LoraConfig, get_peft_model

    base = _llama()
    p = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=4, target_modules=["k_proj", "up_proj"],
                                                       init_lora_weights=False, use_rslora=True)).eval()
    p.save_pretrained(str(tmp_path / "p"))
    theirs = p(IDS).logits
    m = load_adapter(copy.deepcopy(base), str(tmp_path / "p")).eval()
    torch.testing.assert_close(m(IDS).logits, theirs, rtol=1e-5, atol=1e-5)
    # into an already-injected model with the same targets (the resume path)
    m2 = inject_lora(copy.deepcopy(base), ["k_proj", "up_proj"], r=8, alpha=1, verbose=False)
    load_adapter(m2, str(tmp_path / "p"))
    torch.testing.assert_close(m2.eval()(IDS).logits, theirs, rtol=1e-5, atol=1e-5)


def test_classification_head_saved_as_modules_to_save(tmp_path):
    from peft import PeftModel

    base = _llama(seq_cls=True)
    m = inject_lora(copy.deepcopy(base), ["q_proj", "v_proj"], r=4, alpha=8, verbose=False)
    _randomize_lora(m)
    with torch.no_grad():
        m.score.weight.normal_()
    m.score.weight.requires_grad_(True)  # the new head trains (fastft.models.classifier.mark_trainable)
    mine = m(IDS).logits
    save_adapter(m, str(tmp_path / "c"))
    cfg = json.loads((tmp_path / "c" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["score"]
    other = _llama(seq_cls=True, seed=3)  # same backbone? no: load the original backbone, fresh head
    other.load_state_dict({k: v for k, v in base.state_dict().items() if not k.startswith("score")}, strict=False)
    assert not torch.equal(other.score.weight, m.score.weight)
    peft = PeftModel.from_pretrained(copy.deepcopy(other), str(tmp_path / "c")).eval()
    torch.testing.assert_close(peft(IDS).logits, mine, rtol=1e-5, atol=1e-5)
    back = load_adapter(copy.deepcopy(other), str(tmp_path / "c")).eval()
    torch.testing.assert_close(back(IDS).logits, mine, rtol=0, atol=0)


def test_merge_unmerge_and_merge_lora(tmp_path):
    base = _llama()
    m = inject_lora(copy.deepcopy(base), "all-linear", r=4, alpha=8, verbose=False)
    _randomize_lora(m)
    want = m(IDS).logits
    layer = m.model.layers[0].self_attn.q_proj
    w0 = layer.base_layer.weight.clone()
    layer.merge()
    torch.testing.assert_close(m(IDS).logits, want, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=0, atol=1e-6)
    merged = merge_lora(m)
    assert not any(isinstance(x, (LoRALinear, Int8Linear)) for x in merged.modules())
    merged.save_pretrained(str(tmp_path / "m"))
    from transformers import AutoModelForCausalLM

    torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"))(IDS).logits, want,
                               rtol=1e-5, atol=1e-5)


def test_merge_into_int8_base_dequantises_and_warns():
    torch.manual_seed(0)
    layer = LoRALinear(Int8Linear.from_linear(nn.Linear(67, 131)), r=4, alpha=4)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(5, 67)
    want = layer(x)
    with pytest.warns(UserWarning, match="dequantised"):
        layer.merge()
    assert type(layer.base_layer) is nn.Linear
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


def test_bad_input(tmp_path):
    base = _llama()
    with pytest.raises(ConfigError, match=r"no module matched; linear layers here: .*q_proj"):
        inject_lora(copy.deepcopy(base), ["qq_proj"], r=4, alpha=8)
    with pytest.raises(ConfigError, match=r"\['attn_q'\] matched no linear layer; linear layers here: .*v_proj"):
        inject_lora(copy.deepcopy(base), ["q_proj", "attn_q"], r=4, alpha=8)
    with pytest.raises(ConfigError, match=r"no module matched"):
        inject_lora(copy.deepcopy(base), r"layers\.9\..*", r=4, alpha=8)
    for r in (0, -2):
        with pytest.raises(ConfigError, match=rf"lora.r={r}: expected an integer >= 1"):
            inject_lora(copy.deepcopy(base), ["q_proj"], r=r, alpha=8)
    with pytest.raises(TypeError, match="nn.Linear or Int8Linear, got Embedding"):
        LoRALinear(nn.Embedding(5, 4), r=2, alpha=2)
    conv = nn.Linear(4, 3)
    conv.weight = nn.Parameter(torch.zeros(3, 4, 1))
    with pytest.raises(ValueError, match="2-D"):
        LoRALinear(conv, r=2, alpha=2)
    with pytest.raises(ValueError, match="2-D"):
        Int8Linear.from_linear(conv)
    # an adapter trained on a different base (hidden 32) does not load into hidden 64
    small = inject_lora(_llama(hidden=32), ["q_proj"], r=4, alpha=8, verbose=False)
    save_adapter(small, str(tmp_path / "small"))
    with pytest.raises(UserError, match=r"has shape \(4, 32\), this model expects \(4, 64\)"):
        load_adapter(copy.deepcopy(base), str(tmp_path / "small"))
    with pytest.raises(UserError, match="expected adapter_config.json"):
        load_adapter(copy.deepcopy(base), str(tmp_path / "nothing"))
    with pytest.raises(UserError, match="no LoRA layers"):
        save_adapter(copy.deepcopy(base), str(tmp_path / "x"))


def test_int8_base_lora_training_run(tmp_path):
    """fastft train --lora.int8_base true on the tiny model: loss falls, int8 weights untouched."""
    from fastft.config import load_config
    from fastft.train.cli import build
    from fastft.train.trainer import Trainer
    from trainer_helpers import make_tiny_model

    tiny = make_tiny_model(tmp_path / "tiny")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_config(None, ["--model.path", str(tiny), "--output.dir", str(tmp_path / "run"),
                                 "--train.progress", "false", "--output.tensorboard", "false",
                                 "--train.batch_size", "8", "--train.max_steps", "20", "--finetune.mode", "lora",
                                 "--lora.int8_base", "true", "--lora.target_modules", "q_proj,v_proj,up_proj,down_proj",
                                 "--train.lr", "1e-2"])
        model, tok, bundle, device = build(cfg)
        q = {n: b.clone() for n, b in model.named_buffers() if n.endswith("qweight")}
        assert len(q) == 2 * 7
        (tmp_path / "run").mkdir()
        s = Trainer(cfg, tmp_path / "run", model, tok, bundle, device).train()
    finally:
        torch.set_num_threads(n)
    assert s["eval_after"]["eval_loss"] < s["eval_before"]["eval_loss"] - 0.05
    assert all(torch.equal(b, q[n]) for n, b in model.named_buffers() if n in q)
    assert (tmp_path / "run" / "final" / "adapter" / "adapter_model.safetensors").is_file()
