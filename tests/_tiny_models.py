"""Tiny random causal LMs built from a config (no download), for the architecture matrix."""
from __future__ import annotations

import warnings

import torch
from transformers import AutoConfig, AutoModelForCausalLM

V = 97  # odd vocabulary
_SIZES = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=64, n_embd=32, n_layer=2, n_head=4,
              n_positions=64, n_inner=48, ffn_dim=48, d_model=32, word_embed_proj_dim=32, n_ctx=64,
              num_layers=2, num_heads=4, d_ff=48, moe_intermediate_size=16, shared_expert_intermediate_size=16,
              num_experts=4, num_local_experts=4, num_experts_per_tok=2, n_routed_experts=4)
# Per-architecture settings beyond the sizes: the logit transforms under test get values far
# from identity at these tiny logits (|x| ~ 1), so a loss that skipped them is visibly wrong
# (tests/test_model_adapters.py::test_skipping_the_transform_would_fail).
EXTRA = {
    "gemma2": dict(final_logit_softcapping=0.3, sliding_window=4),
    "gemma3_text": dict(final_logit_softcapping=0.3, sliding_window=4),
    "cohere": dict(logit_scale=4.0),
    "cohere2": dict(logit_scale=4.0),
    "granite": dict(logits_scaling=0.05, embedding_multiplier=2.0, residual_multiplier=0.5,
                    attention_multiplier=0.2),
    "falcon": dict(new_decoder_architecture=True, num_kv_heads=2, alibi=False),
    "phi3": dict(pad_token_id=0),
    "stablelm": dict(partial_rotary_factor=0.5),
}
# The architectures the matrix must cover (issue 18), each with full and LoRA, padded or not.
REQUIRED = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "cohere",
            "granite", "olmo2", "gpt_neox", "gpt2", "opt", "falcon", "stablelm", "starcoder2")
MAX_PARAMS = 3_000_000


def tiny_config(model_type: str):
    cfg = AutoConfig.for_model(model_type)
    for k, v in {**_SIZES, **EXTRA.get(model_type, {})}.items():
        if k in cfg.__dict__ or k in EXTRA.get(model_type, {}):
            setattr(cfg, k, v)
    for k in list(cfg.__dict__):  # no dropout anywhere: the comparison is exact
        if ("dropout" in k or "pdrop" in k) and isinstance(getattr(cfg, k), float):
            setattr(cfg, k, 0.0)
    if getattr(cfg, "pad_token_id", None) is not None and cfg.pad_token_id >= V:
        cfg.pad_token_id = 0
    return cfg


def build(model_type: str, seed: int = 0):
    """(model in fp32 train mode, None) or (None, reason it cannot be built here)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = tiny_config(model_type)
            with torch.device("meta"):
                n = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())
            if n > MAX_PARAMS:
                return None, f"the config's sizes are not all reachable by the tiny settings ({n:,} params)"
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(cfg).float()
    except Exception as e:  # noqa: BLE001  (any build failure is a skip with its reason)
        return None, f"cannot build from a tiny config offline: {type(e).__name__}: {str(e)[:120]}"
    model.train()
    return model, None
