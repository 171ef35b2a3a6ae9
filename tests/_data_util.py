"""Helpers for the data tests: a tiny byte-level BPE tokenizer with a ChatML template (built in
~50 ms from a fixed corpus, no files or network) and a tiny random Llama whose vocabulary fits it."""
from __future__ import annotations

import functools

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "What is 2 + 3? 2 + 3 = 5. The capital of France is Paris.",
    "Reverse the letters of the word kernel. lenrek. Define overfitting in one sentence.",
    "The pasta was wonderful and I would happily come back. The app is confusing and crashes.",
    "system user assistant You are a helpful assistant. Hello! Hi, how can I help you today?",
    "Convert 21 kilometres to metres. 21 km = 21000 m. How many minutes are in 3 hours? 180 minutes.",
]


@functools.lru_cache(maxsize=None)
def tiny_tokenizer(chat_template: bool = True, vocab_size: int = 400):
    """A ``PreTrainedTokenizerFast`` (byte-level BPE, vocab <= ``vocab_size``), eos = pad =
    ``<|im_end|>`` like SmolLM2, with a ChatML template unless ``chat_template=False``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                   bos_token="<|endoftext|>")
    if chat_template:
        fast.chat_template = CHATML
    return fast


def tiny_llama(vocab_size: int = 400, seed: int = 0, attn: str = "eager"):
    """A 2-layer random Llama (hidden 64, GQA 4/2 heads) in fp32."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      attn_implementation=attn)
    return LlamaForCausalLM(cfg).eval()
