"""Tokenizer and chat templates.

References: raw SentencePiece for the tokenizer; for `llama2`, an independent re-implementation of Meta's
`chat_completion` loop (string formatting + `sp.encode`); for every template, the format written out by hand
as one literal string (from Meta's code, the ChatML spec, open-instruct's Tulu format, the OASST/Guanaco
layout, Stanford Alpaca's prompt) whose markers `<s>`, `</s>`, `<|im_start|>`, `<|im_end|>` become token ids
and whose text in between goes through SentencePiece.
"""
import json
import re

import pytest
import sentencepiece as spm
import torch

from conftest import train_sentencepiece
from llama.chat import TEMPLATES, _encode_segments, encode_chat, required_special_tokens, stop_ids
from llama.model import ModelArgs, Transformer, resize_embeddings
from llama.tokenizer import Tokenizer

@pytest.fixture
def tiny_tokenizer_path(tmp_path):
    return train_sentencepiece(tmp_path)


@pytest.fixture(params=["tiny", "llama2"])
def tok_path(request, tmp_path):
    """Every template test runs on both vocabularies (the real one skips when absent)."""
    if request.param == "tiny":
        return train_sentencepiece(tmp_path)
    return request.getfixturevalue("llama2_tokenizer_path")


DIALOG = [
    {"role": "system", "content": "You are brief."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "  And two plus two?\n"},
    {"role": "assistant", "content": " Four, which is 2+2 = 4. ü€😀 "},
]

# Each template's rendering of DIALOG, written out by hand from the format's definition.
EXPECTED_TEXT = {
    "llama2": "<s>[INST] <<SYS>>\nYou are brief.\n<</SYS>>\n\nWhat is the capital of France? [/INST] Paris. </s>"
              "<s>[INST] And two plus two? [/INST] Four, which is 2+2 = 4. ü€😀 </s>",
    "chatml": "<s><|im_start|>system\nYou are brief.<|im_end|>\n<|im_start|>user\nWhat is the capital of France?"
              "<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>\n<|im_start|>user\nAnd two plus two?<|im_end|>\n"
              "<|im_start|>assistant\nFour, which is 2+2 = 4. ü€😀<|im_end|>",
    "tulu": "<s><|system|>\nYou are brief.\n<|user|>\nWhat is the capital of France?\n<|assistant|>\nParis.</s>\n"
            "<|user|>\nAnd two plus two?\n<|assistant|>\nFour, which is 2+2 = 4. ü€😀</s>",
    "oasst": "<s>### System: You are brief.\n### User: What is the capital of France?\n### Assistant: Paris.</s>\n"
             "### User: And two plus two?\n### Assistant: Four, which is 2+2 = 4. ü€😀</s>",
}
ALPACA_DIALOG = [{"role": "user", "content": "Name the capital.", "input": "France"},
                 {"role": "assistant", "content": "Paris."}]
ALPACA_TEXT = ("<s>Below is an instruction that describes a task, paired with an input that provides further context. "
               "Write a response that appropriately completes the request.\n\n### Instruction:\nName the capital.\n\n"
               "### Input:\nFrance\n\n### Response:\nParis.</s>")
ALPACA_NO_INPUT_TEXT = ("<s>Below is an instruction that describes a task. Write a response that appropriately "
                        "completes the request.\n\n### Instruction:\nName the capital.\n\n### Response:\nParis.</s>")
# The text each reply decodes to (the mask's tokens minus the end token).
REPLIES = {"llama2": ["Paris. ", "Four, which is 2+2 = 4. ü€😀 "],
           **{t: ["Paris.", "Four, which is 2+2 = 4. ü€😀"] for t in ("chatml", "tulu", "oasst")}}


def ids_from_text(sp: spm.SentencePieceProcessor, text: str, special: dict[str, int]) -> list[int]:
    """Reference tokenization: markers -> ids, the text between them -> sp.encode (one call per stretch)."""
    markers = {"<s>": sp.bos_id(), "</s>": sp.eos_id(), **special}
    parts = re.split("(" + "|".join(map(re.escape, markers)) + ")", text)
    return [i for k, p in enumerate(parts) for i in ([markers[p]] if k % 2 else sp.encode(p) if p else [])]


def meta_chat_ids(sp: spm.SentencePieceProcessor, dialog: list[dict]) -> list[int]:
    """Meta's `chat_completion` prompt building for one dialog, written out straight from its definition."""
    B_INST, E_INST = "[INST]", "[/INST]"
    B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
    if dialog[0]["role"] == "system":
        dialog = [{"role": dialog[1]["role"], "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]}
                  ] + dialog[2:]
    tokens = []
    for prompt, answer in zip(dialog[::2], dialog[1::2]):
        tokens += [sp.bos_id()] + sp.encode(f"{B_INST} {(prompt['content']).strip()} {E_INST} "
                                            f"{(answer['content']).strip()} ") + [sp.eos_id()]
    if dialog[-1]["role"] == "user":
        tokens += [sp.bos_id()] + sp.encode(f"{B_INST} {(dialog[-1]['content']).strip()} {E_INST}")
    return tokens


def chat_tokenizer(path) -> Tokenizer:
    tok = Tokenizer(path)
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    return tok


def reply_groups(ids: list[int], mask: list[bool]) -> list[list[int]]:
    """Maximal runs of trained tokens."""
    groups, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            groups.append(cur)
            cur = []
    return groups + ([cur] if cur else [])


# ---------------------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_matches_sentencepiece(tok_path):
    sp = spm.SentencePieceProcessor(model_file=str(tok_path))
    tok = Tokenizer(tok_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.n_words) == (sp.bos_id(), sp.eos_id(), -1, sp.vocab_size())
    for text in ["Hello world", "  two  spaces\nand a newline ", "ü€😀 x", "2+2 = 4", ""]:
        assert tok.encode(text, bos=True, eos=True) == [sp.bos_id()] + sp.encode(text) + [sp.eos_id()]
        assert tok.encode(text, bos=False, eos=False) == sp.encode(text)
        assert tok.decode(tok.encode(text, bos=True, eos=True)) == text


def test_tokenizer_from_folder(tiny_tokenizer_path):
    assert Tokenizer(tiny_tokenizer_path.parent).encode("fox") == Tokenizer(tiny_tokenizer_path).encode("fox")


def test_llama2_tokenizer_ids(llama2_tokenizer_path):
    tok = Tokenizer(llama2_tokenizer_path)
    assert (tok.n_words, tok.bos_id, tok.eos_id, tok.pad_id) == (32000, 1, 2, -1)


def test_added_special_tokens(tok_path, tmp_path):
    sp = spm.SentencePieceProcessor(model_file=str(tok_path))
    V = sp.vocab_size()
    tok = Tokenizer(tok_path)
    assert tok.add_special_tokens(["<|im_start|>", "<|im_end|>"]) == [V, V + 1]
    assert tok.add_special_tokens(["<|im_end|>", "<|im_start|>"]) == [V + 1, V]  # idempotent
    assert tok.add_special_tokens(["<s>"]) == [sp.bos_id()]  # already a piece: keeps its id
    assert tok.n_words == V + 2
    text = "<|im_start|>user\nhi<|im_end|><|im_end|>\nok"
    want = [V] + sp.encode("user\nhi") + [V + 1, V + 1] + sp.encode("\nok")
    assert tok.encode(text) == want
    assert tok.decode(want) == text
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([V + 2])

    out = tmp_path / "saved"
    tok.save(out)
    assert json.loads((out / "added_tokens.json").read_text()) == {"<|im_start|>": V, "<|im_end|>": V + 1, "<s>": 1}
    assert (out / "tokenizer.model").read_bytes() == tok_path.read_bytes()
    back = Tokenizer(out / "tokenizer.model")
    assert back.special_tokens == tok.special_tokens and back.n_words == V + 2
    assert back.encode(text) == want

    Tokenizer(tok_path).save(out)  # no added tokens: a stale added_tokens.json must not survive
    assert not (out / "added_tokens.json").exists()


def test_longest_added_token_wins(tiny_tokenizer_path):
    tok = Tokenizer(tiny_tokenizer_path)
    a, ab = tok.add_special_tokens(["<a>", "<a><b>"])
    assert tok.encode("<a><b><a>") == [ab, a]


def test_bad_added_tokens_file(tiny_tokenizer_path):
    V = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer_path)).vocab_size()
    added = tiny_tokenizer_path.parent / "added_tokens.json"
    added.write_text(json.dumps({"<x>": V + 5}))
    with pytest.raises(ValueError, match="added_tokens.json: the ids of the added tokens must be"):
        Tokenizer(tiny_tokenizer_path)
    added.write_text(json.dumps({"<x>": 5}))
    with pytest.raises(ValueError, match="piece 5"):
        Tokenizer(tiny_tokenizer_path)
    with pytest.raises(ValueError, match="does not exist"):
        Tokenizer(tiny_tokenizer_path.parent / "nope.model")


def test_added_tokens_with_resized_model(tiny_tokenizer_path):
    """The caller's recipe: add tokens, grow the embedding, then the new ids run through the model."""
    tok = Tokenizer(tiny_tokenizer_path)
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=tok.n_words, multiple_of=16,
                     ffn_dim_multiplier=None, norm_eps=1e-5, rope_theta=10000.0, max_seq_len=256)
    model = Transformer(args)
    ids = tok.add_special_tokens(required_special_tokens("chatml"))
    resize_embeddings(model, tok.n_words)
    rows = model.tok_embeddings.weight.shape[0]
    assert rows >= tok.n_words and rows % 128 == 0 and model.output.weight.shape[0] == rows
    x, _ = encode_chat(tok, DIALOG, "chatml")
    assert set(ids) <= set(x)
    logits = model(torch.tensor([x]))
    assert logits.shape == (1, len(x), rows) and torch.isfinite(logits).all()


# ---------------------------------------------------------------------------------------------------------
# Chat templates


LLAMA2_DIALOGS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Always answer with Haiku"}, {"role": "user", "content": "I am going to Paris, what should I see?"}],
    [{"role": "user", "content": "I am going to Paris, what should I see?"},
     {"role": "assistant", "content": "Paris, the capital of France, is known for the Eiffel Tower.\n\n1. Eiffel Tower"},
     {"role": "user", "content": "What is so great about #1?"}],
    [{"role": "system", "content": " Be\nterse. "}, {"role": "user", "content": "  x  "},
     {"role": "assistant", "content": "  yes  "}, {"role": "user", "content": "(2+2)*3?"},
     {"role": "assistant", "content": "12."}],
    [{"role": "user", "content": "Translate 'ü€😀' to words"}, {"role": "assistant", "content": "u-umlaut, euro, grin"}],
]


@pytest.mark.parametrize("k", range(len(LLAMA2_DIALOGS)))
def test_llama2_matches_meta_chat_completion(llama2_tokenizer_path, k):
    sp = spm.SentencePieceProcessor(model_file=str(llama2_tokenizer_path))
    dialog = LLAMA2_DIALOGS[k]
    gen = dialog[-1]["role"] == "user"
    ids, mask = encode_chat(Tokenizer(llama2_tokenizer_path), dialog, "llama2", add_generation_prompt=gen)
    assert ids == meta_chat_ids(sp, dialog)
    replies = [m["content"].strip() + " " for m in dialog if m["role"] == "assistant"]
    groups = reply_groups(ids, mask)
    assert [sp.decode(g[:-1]) for g in groups] == replies and all(g[-1] == sp.eos_id() for g in groups)


@pytest.mark.parametrize("template", ["llama2", "chatml", "tulu", "oasst"])
def test_template_ids_and_mask(tok_path, template):
    tok = chat_tokenizer(tok_path)
    ids, mask = encode_chat(tok, DIALOG, template)
    assert ids == ids_from_text(tok.sp, EXPECTED_TEXT[template], tok.special_tokens)
    if template == "llama2":
        assert ids == meta_chat_ids(tok.sp, DIALOG)
    end = stop_ids(tok, template)[-1]
    groups = reply_groups(ids, mask)
    assert [tok.decode(g[:-1]) for g in groups] == REPLIES[template]
    assert [g[-1] for g in groups] == [end, end]
    # The generation prompt is exactly the ids before the last reply.
    prompt, pmask = encode_chat(tok, DIALOG[:-1], template, add_generation_prompt=True)
    assert ids[: len(prompt)] == prompt and pmask == mask[: len(prompt)]
    assert ids[len(prompt):] == groups[-1]


@pytest.mark.parametrize("with_input", [True, False])
def test_alpaca(tok_path, with_input):
    tok = Tokenizer(tok_path)
    dialog = [dict(ALPACA_DIALOG[0]), ALPACA_DIALOG[1]]
    if not with_input:
        del dialog[0]["input"]
    ids, mask = encode_chat(tok, dialog, "alpaca")
    assert ids == ids_from_text(tok.sp, ALPACA_TEXT if with_input else ALPACA_NO_INPUT_TEXT, {})
    (group,) = reply_groups(ids, mask)
    assert tok.decode(group[:-1]) == "Paris." and group[-1] == tok.eos_id
    prompt, _ = encode_chat(tok, dialog[:1], "alpaca", add_generation_prompt=True)
    assert ids[: len(prompt)] == prompt and ids[len(prompt):] == group
    # A system message replaces the opening sentence.
    ids, _ = encode_chat(tok, [{"role": "system", "content": "Answer in French."}] + dialog, "alpaca")
    assert tok.decode(ids).startswith("Answer in French.\n\n### Instruction:\nName the capital.\n\n")


def test_input_key_on_other_templates(tiny_tokenizer_path):
    tok = Tokenizer(tiny_tokenizer_path)
    a, _ = encode_chat(tok, ALPACA_DIALOG, "tulu")
    b, _ = encode_chat(tok, [{"role": "user", "content": "Name the capital.\n\nFrance"}, ALPACA_DIALOG[1]], "tulu")
    assert a == b


def test_straddling_boundary_counts_as_reply(llama2_tokenizer_path):
    tok = Tokenizer(llama2_tokenizer_path)
    assert tok.sp.encode("hello", out_type=str) == ["▁hello"]  # "hel" + "lo" is one piece
    ids, mask = _encode_segments(tok, [("hel", False), ("lo", True)])
    assert ids == tok.sp.encode("hello") and mask == [True]


def test_stop_ids_and_required_tokens(tiny_tokenizer_path):
    tok = chat_tokenizer(tiny_tokenizer_path)
    assert required_special_tokens("chatml") == ["<|im_start|>", "<|im_end|>"]
    assert all(required_special_tokens(t) == [] for t in TEMPLATES if t != "chatml")
    assert stop_ids(tok, "chatml") == [tok.eos_id, tok.special_tokens["<|im_end|>"]]
    assert stop_ids(tok, "llama2") == [tok.eos_id]


USER, BOT = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}


@pytest.mark.parametrize("template,messages,gen,match", [
    ("llama2", [], False, "dialog is empty"),
    ("llama2", [USER, {"role": "bot", "content": "x"}], False, "message 1 has unknown role 'bot'"),
    ("tulu", [USER, {"role": "assistant", "content": "  "}], False, r"message 1 \(assistant\) has empty content"),
    ("tulu", [USER, {"role": "assistant", "content": None}], False, "content must be a string"),
    ("llama2", [USER, USER, BOT], False, "message 1 is 'user' where llama2 needs 'assistant'"),
    ("llama2", [BOT], False, "message 0 is 'assistant' where llama2 needs 'user'"),
    ("alpaca", [USER, BOT, USER, BOT], False, "alpaca is single-turn"),
    ("chatml", [USER, {"role": "system", "content": "s"}], False, "system message may only come first"),
    ("oasst", [{"role": "system", "content": "s"}], False, "only a system message"),
    ("oasst", [USER, BOT], True, "last message to be a user turn"),
    ("tulu", [BOT | {"input": "x"}], False, "'input' must be a string on a user message"),
    ("vicuna", [USER], False, "unknown chat template 'vicuna'"),
])
def test_bad_dialogs(tiny_tokenizer_path, template, messages, gen, match):
    with pytest.raises(ValueError, match=match):
        encode_chat(chat_tokenizer(tiny_tokenizer_path), messages, template, add_generation_prompt=gen)


def test_chatml_needs_its_tokens(tiny_tokenizer_path):
    with pytest.raises(ValueError, match=r"lacks '<\|im_start\|>'.*add_special_tokens"):
        encode_chat(Tokenizer(tiny_tokenizer_path), [USER, BOT], "chatml")
    with pytest.raises(ValueError, match="im_end"):
        stop_ids(Tokenizer(tiny_tokenizer_path), "chatml")
