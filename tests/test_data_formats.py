"""Label masks of the chat, prompt/completion and plain-text formats, checked token by token,
plus excess_length and the chat-template errors."""
from __future__ import annotations

import pytest

from _data_util import CHATML, tiny_tokenizer
from fastft.data.chat import IGNORE, apply_excess_length, encode_rows
from fastft.errors import DataError

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5."},
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "Hi, how can I help you today?"},
]


def _runs(tok, ex):
    """Walk the example token by token and group consecutive tokens by trained/masked:
    [(trained, decoded text), ...]. Each trained token's label must equal its input id."""
    runs = []
    for tid, lab in zip(ex["input_ids"], ex["labels"], strict=True):
        trained = lab != IGNORE
        if trained:
            assert lab == tid
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(tid)
        else:
            runs.append((trained, [tid]))
    return [(t, tok.decode(ids)) for t, ids in runs]


def test_multi_turn_chat_trains_only_assistant_turns_and_their_eos():
    tok = tiny_tokenizer()
    ex = encode_rows([{"messages": CONVERSATION}], "chat", tok)[0]
    assert _runs(tok, ex) == [
        (False, "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?"
                "<|im_end|>\n<|im_start|>assistant\n"),
        (True, "2 + 3 = 5.<|im_end|>"),
        (False, "\n<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n"),
        (True, "Hi, how can I help you today?<|im_end|>"),
        (False, "\n"),
    ]
    # EOS is trained even though pad == eos here (SmolLM2 does the same).
    assert tok.pad_token_id == tok.eos_token_id
    assert [l for l in ex["labels"] if l != IGNORE].count(tok.eos_token_id) == 2
    # The prompt tokens are exactly what generation feeds the model.
    prompt = tok.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    n = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert ex["input_ids"][:n] == tok(prompt, add_special_tokens=False)["input_ids"]
    assert all(l == IGNORE for l in ex["labels"][:n]) and ex["labels"][n] != IGNORE


def test_chat_train_on_inputs_trains_everything():
    tok = tiny_tokenizer()
    ex = encode_rows([{"messages": CONVERSATION}], "chat", tok, train_on_inputs=True)[0]
    assert ex["labels"] == ex["input_ids"]


def test_chat_template_without_eos_gets_one_appended():
    tok = tiny_tokenizer()
    plain = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" \
            "{% if add_generation_prompt %}assistant: {% endif %}"
    ex = encode_rows([{"messages": CONVERSATION[1:3]}], "chat", tok, chat_template=plain)[0]
    assert _runs(tok, ex) == [(False, "user: What is 2 + 3?\nassistant: "), (True, "2 + 3 = 5.\n<|im_end|>")]


def test_prompt_completion_and_text_masks():
    tok = tiny_tokenizer()
    pc = encode_rows([{"prompt": "Convert 21 kilometres to metres.", "completion": " 21000 m."}],
                     "prompt_completion", tok)[0]
    assert _runs(tok, pc) == [(False, "Convert 21 kilometres to metres."), (True, " 21000 m.<|im_end|>")]
    tx = encode_rows([{"text": "The pasta was wonderful."}], "text", tok)[0]
    assert _runs(tok, tx) == [(True, "The pasta was wonderful.<|im_end|>")]


def test_missing_chat_template_is_a_clear_error():
    tok = tiny_tokenizer(chat_template=False)
    with pytest.raises(DataError, match="train.jsonl: the tokenizer has no chat template.*data.chat_template"):
        encode_rows([{"messages": CONVERSATION}], "chat", tok, source="train.jsonl")


def test_bad_conversations_are_clear_errors():
    tok = tiny_tokenizer()
    with pytest.raises(DataError, match="row 0: conversation has no 'assistant' message"):
        encode_rows([{"messages": CONVERSATION[:2]}], "chat", tok)
    with pytest.raises(DataError, match="row 1: message 0 must be an object with string 'role' and 'content'"):
        encode_rows([{"messages": CONVERSATION}, {"messages": [{"role": "user"}]}], "chat", tok)
    rewriting = ("{% for m in messages %}{% if loop.last %}{{ m['role'] }}: {{ m['content'] }}\n{% endif %}"
                 "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(DataError, match="prefix-consistently"):
        encode_rows([{"messages": CONVERSATION}], "chat", tok, chat_template=rewriting)


def test_chat_template_from_file(tmp_path):
    tok = tiny_tokenizer(chat_template=False)
    p = tmp_path / "t.jinja"
    p.write_text(CHATML)
    ex = encode_rows([{"messages": CONVERSATION}], "chat", tok, chat_template=str(p))[0]
    assert ex == encode_rows([{"messages": CONVERSATION}], "chat", tiny_tokenizer())[0]


def test_excess_length_truncate_drop_error():
    exs = [{"input_ids": list(range(10)), "labels": [IGNORE] * 6 + list(range(6, 10))},
           {"input_ids": list(range(4)), "labels": [IGNORE, 1, 2, 3]},
           {"input_ids": list(range(8)), "labels": [IGNORE] * 4 + list(range(4, 8))}]
    kept, counts = apply_excess_length(exs, 6, "truncate")
    # row 0 loses its whole response -> dropped; row 2 keeps two target tokens.
    assert counts == {"truncated": 2, "dropped_too_long": 0, "dropped_no_target": 1}
    assert kept == [exs[1], {"input_ids": list(range(6)), "labels": [IGNORE] * 4 + [4, 5]}]
    kept, counts = apply_excess_length(exs, 6, "drop")
    assert kept == [exs[1]] and counts["dropped_too_long"] == 2
    with pytest.raises(DataError, match=r"train.jsonl: row 0 has 10 tokens > data.max_length=6"):
        apply_excess_length(exs, 6, "error", source="train.jsonl")
    with pytest.raises(DataError, match="excess_length='cut'"):
        apply_excess_length(exs, 6, "cut")


@pytest.mark.slow  # loads the SmolLM2 tokenizer (~10 s from the dequantised-GGUF cache, ~30 s the first time)
def test_multi_turn_chat_mask_with_the_smollm2_template():
    """SmolLM2's template injects a default system prompt; only the answers and their
    <|im_end|> (its EOS, also its pad) are trained."""
    from fastft.models.loading import load_tokenizer, materialize

    tok = load_tokenizer(materialize("default"))
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    msgs = CONVERSATION[1:3] + [{"role": "user", "content": "And 3 + 4?"}, {"role": "assistant", "content": "7."}]
    runs = _runs(tok, encode_rows([{"messages": msgs}], "chat", tok)[0])
    assert [r for r in runs if r[0]] == [(True, "2 + 3 = 5.<|im_end|>"), (True, "7.<|im_end|>")]
    assert runs[0][1].startswith("<|im_start|>system\n") and runs[0][1].endswith("<|im_start|>assistant\n")
    assert runs[2] == (False, "\n<|im_start|>user\nAnd 3 + 4?<|im_end|>\n<|im_start|>assistant\n")


def test_assistant_first_turn_does_not_train_the_default_system_prompt():
    tok = tiny_tokenizer()
    with_default = ("{% if not messages or messages[0]['role'] != 'system' %}"
                    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}" + CHATML)
    msgs = [{"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "How can I help you today?"}]
    runs = _runs(tok, encode_rows([{"messages": msgs}], "chat", tok, chat_template=with_default)[0])
    assert runs[0] == (False, "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>assistant\n")
    assert [r for r in runs if r[0]] == [(True, "Hello!<|im_end|>"), (True, "How can I help you today?<|im_end|>")]
