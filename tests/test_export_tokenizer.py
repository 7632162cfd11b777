"""Exported folders serve as they were trained: Hugging Face transformers loads the tokenizer files we write
(offline), plain text gets BOS + SentencePiece's ids, and `apply_chat_template` with our Jinja chat_template
gives exactly `encode_chat`'s ids for every template; train.py's adapter/ and merged/ folders hold the files
and transformers loads them; llama.cpp's gguf-py reads the template and add_bos_token from them.

References: SentencePiece itself for plain text; transformers' Jinja rendering and `tokenizers` for the chat
side (encode_chat's llama2 is checked against Meta's chat_completion in test_tokenizer_chat.py)."""
import json
import random

import pytest
import torch
from sentencepiece import SentencePieceProcessor

import train
from llama import ModelArgs, Tokenizer, Transformer, save_model
from llama.chat import CHAT_TEMPLATES, TEMPLATES, encode_chat, required_special_tokens
from llama.export import hf_tokenizer_json, save_tokenizer_files

transformers = pytest.importorskip("transformers")

SYS = {"role": "system", "content": "You are brief. "}
U1 = {"role": "user", "content": " What is the capital of France?"}
A1 = {"role": "assistant", "content": "Paris.\n"}
U2 = {"role": "user", "content": "And two plus two? ü€😀"}
A2 = {"role": "assistant", "content": "Four, which is 2+2 = 4."}
INPUT = {"role": "user", "content": "Summarize the text.", "input": " The cat sat on the mat.  "}
DIALOGS = {  # name: (messages, with a generation prompt too)
    "one turn": ([U1, A1], False), "prompt": ([U1], True), "system": ([SYS, U1, A1], False),
    "system prompt": ([SYS, U1], True), "multi-turn": ([SYS, U1, A1, U2, A2], False),
    "multi-turn prompt": ([U1, A1, U2], True), "empty system": ([{"role": "system", "content": ""}, U1, A1], False),
    "input": ([INPUT, A1], False), "input prompt": ([INPUT], True),
}
TEXTS = ["Hello world", " leading space", "  two leading spaces", "trailing  ", "a\n\nb\tc", "naïve 日本語 🦙",
         "[INST] <<SYS>>\nhi\n<</SYS>>\n\n", "x" * 40, ""]


def export(tok_path, template, tmp_path, model=True):
    tok = Tokenizer(tok_path)
    tok.add_special_tokens(required_special_tokens(template))
    save_tokenizer_files(tok, tmp_path / template, template, model=model)
    return tok, sorted(p.name for p in (tmp_path / template).iterdir()), tmp_path / template


def hf_chat_ids(hf, messages, gen):
    ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)
    return list(ids["input_ids"] if not isinstance(ids, list) else ids)


@pytest.mark.parametrize("template", TEMPLATES)
def test_apply_chat_template_gives_encode_chat_ids(llama2_tokenizer_path, tmp_path, template):
    tok, _, folder = export(llama2_tokenizer_path, template, tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    checked = 0
    for name, (messages, gen) in DIALOGS.items():
        if template == "alpaca" and len([m for m in messages if m["role"] != "system"]) > 2:
            continue  # single-turn
        for g in (False, True) if gen else (False,):
            ours = encode_chat(tok, messages, template, add_generation_prompt=g)[0]
            assert hf_chat_ids(hf, messages, g) == ours, (template, name, g)
            assert ours[0] == tok.bos_id and ours[1] != tok.bos_id  # one BOS, from the template text
            checked += 1
    assert checked >= 10


def test_chatml_added_tokens(llama2_tokenizer_path, tmp_path):
    tok, files, folder = export(llama2_tokenizer_path, "chatml", tmp_path)
    assert "added_tokens.json" in files
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert {k: (v["content"], v["special"]) for k, v in cfg["added_tokens_decoder"].items() if int(k) >= 32000} == {
        "32000": ("<|im_start|>", True), "32001": ("<|im_end|>", True)}
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    assert hf.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [32000, 32001]
    assert len(hf) == 32002
    ids = hf_chat_ids(hf, [U1, A1], False)
    assert ids.count(32000) == 2 and ids.count(32001) == 2
    reply = [i for i, m in zip(*encode_chat(tok, [U1, A1], "chatml")) if m]
    assert hf.decode(reply) == "Paris.<|im_end|>" and hf.decode(reply, skip_special_tokens=True) == "Paris."
    gen = json.loads((folder / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 1, "eos_token_id": [2, 32001]}


@pytest.mark.parametrize("which", ["llama2", "demo"])
def test_plain_text_is_bos_plus_sentencepiece_ids(llama2_tokenizer_path, tmp_path, which):
    """tokenizer(text) adds BOS and then tokenizes as SentencePiece does, leading spaces included (Llama 2's
    model keeps them; the demo's collapses extra spaces, restated as normalizers)."""
    path = llama2_tokenizer_path if which == "llama2" else train.DEMO / "tiny-llama" / "tokenizer.model"
    _, files, folder = export(path, "llama2", tmp_path, model=False)
    assert files == ["special_tokens_map.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    sp = SentencePieceProcessor(model_file=str(path))
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    for text in TEXTS:
        assert hf(text)["input_ids"] == [1] + sp.encode(text), repr(text)
        assert hf(text, add_special_tokens=False)["input_ids"] == sp.encode(text), repr(text)
    rng = random.Random(0)  # random text: BPE merges, byte fallback and whitespace handling agree everywhere
    alphabet = ["the", "ing", "a", "b", " ", " ", "  ", "\n", "\t", ".", ",", "é", "日", "🦙", "\u200b", "Hello", "x"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))) for _ in range(500)]
    assert hf(texts, add_special_tokens=False)["input_ids"] == [sp.encode(t) for t in texts]
    text = "The quick brown fox: naïve café, 日本語 🦙."
    assert hf.decode(hf(text)["input_ids"], skip_special_tokens=True) == text
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert cfg["add_bos_token"] is True and cfg["add_eos_token"] is False
    assert cfg["chat_template"] == CHAT_TEMPLATES["llama2"]
    assert (hf.bos_token, hf.eos_token, hf.unk_token, hf.pad_token) == ("<s>", "</s>", "<unk>", None)


def test_no_tokenizer_json_for_a_model_it_cannot_restate(tmp_path):
    """A SentencePiece model outside what hf_tokenizer_json restates exactly (here unigram, nmt_nfkc) gets no
    tokenizer.json; the config then names LlamaTokenizer, which converts tokenizer.model itself."""
    import sentencepiece as spm
    (tmp_path / "corpus.txt").write_text("".join(f"the opposite of {a} is {b}\n" for a, b in
                                                 [("hot", "cold"), ("up", "down"), ("big", "small")] * 30))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "uni"),
                                   vocab_size=24, model_type="unigram", minloglevel=2)
    tok = Tokenizer(tmp_path / "uni.model")
    assert hf_tokenizer_json(tok) is None
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "tokenizer.json").write_text("{}")  # stale, from an earlier export
    save_tokenizer_files(tok, tmp_path / "out", "oasst", model=True)
    assert not (tmp_path / "out" / "tokenizer.json").exists()
    cfg = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "LlamaTokenizer" and cfg["legacy"] is True


def test_save_model_writes_tokenizer_files_with_a_template(llama2_tokenizer_path, tmp_path):
    """save_model(tokenizer=path) copies the tokenizer as before; with template= it writes the HF files too,
    in either layout (train.py's model/ is Meta layout)."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=32000, multiple_of=16, max_seq_len=256))
    save_model(model, tmp_path / "plain", layout="meta", tokenizer=llama2_tokenizer_path)
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["consolidated.00.pth", "params.json",
                                                                     "tokenizer.model"]
    save_model(model, tmp_path / "meta", layout="meta", tokenizer=llama2_tokenizer_path, template="tulu")
    assert sorted(p.name for p in (tmp_path / "meta").iterdir()) == [
        "consolidated.00.pth", "generation_config.json", "params.json", "special_tokens_map.json", "tokenizer.json",
        "tokenizer.model", "tokenizer_config.json"]
    cfg = json.loads((tmp_path / "meta" / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == CHAT_TEMPLATES["tulu"] and cfg["model_max_length"] == 256
    with pytest.raises(ValueError, match="tokenizer="):
        save_model(model, tmp_path / "x", template="tulu")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """train.py on a tiny random Llama with Meta's tokenizer, ChatML (two added tokens), LoRA, merged in HF layout."""
    from conftest import LLAMA2_TOKENIZER as llama2_tokenizer_path
    if not llama2_tokenizer_path.exists():
        pytest.skip(f"Meta's Llama 2 tokenizer not found at {llama2_tokenizer_path} (set LLAMA2_TOKENIZER)")
    d = tmp_path_factory.mktemp("export_run")
    ckpt = d / "ckpt"
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=32000, multiple_of=16, max_seq_len=128))
    save_model(model, ckpt, layout="meta", tokenizer=llama2_tokenizer_path)
    rows = [{"messages": [{"role": "user", "content": f"Opposite of {a}?"}, {"role": "assistant", "content": b}]}
            for a, b in [("hot", "cold"), ("up", "down"), ("big", "small"), ("fast", "slow")] * 3]
    (ckpt / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = d / "out"
    assert train.main(["--ckpt", str(ckpt), "--data", str(ckpt / "data.jsonl"), "--out", str(out), "--template",
                       "chatml", "--quant", "none", "--seq-len", "64", "--batch-size", "2", "--max-steps", "1",
                       "--merge", "--merge-layout", "hf"]) == 0
    return out


def test_train_writes_the_files_each_folder_needs(trained):
    tok_files = {"tokenizer.model", "added_tokens.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json"}
    assert {p.name for p in (trained / "adapter").iterdir()} == tok_files | {"adapter_model.safetensors",
                                                                              "adapter_config.json"}
    assert {p.name for p in (trained / "merged").iterdir()} == tok_files | {"config.json", "model.safetensors",
                                                                             "generation_config.json",
                                                                             "merge_report.json"}
    for folder in ("adapter", "merged"):
        cfg = json.loads((trained / folder / "tokenizer_config.json").read_text())
        assert cfg["chat_template"] == CHAT_TEMPLATES["chatml"]
        assert cfg["model_max_length"] == 4096  # Llama 2's context (a Meta params.json does not record it)
    gen = json.loads((trained / "merged" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [2, 32001]
    hf = transformers.AutoTokenizer.from_pretrained(trained / "adapter")  # vLLM reads an adapter's tokenizer
    ours = Tokenizer(trained / "adapter" / "tokenizer.model")
    assert hf_chat_ids(hf, [U1, A1, U2], True) == encode_chat(ours, [U1, A1, U2], "chatml", True)[0]


def test_transformers_loads_the_merged_folder(trained):
    merged = trained / "merged"
    model = transformers.AutoModelForCausalLM.from_pretrained(merged)
    gen = transformers.GenerationConfig.from_pretrained(merged)
    assert (gen.bos_token_id, gen.eos_token_id) == (1, [2, 32001])
    assert model.generation_config.eos_token_id == [2, 32001]
    hf = transformers.AutoTokenizer.from_pretrained(merged)
    ours = Tokenizer(merged / "tokenizer.model")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Opposite of hot?"}]
    ids = hf_chat_ids(hf, messages, True)
    assert ids == encode_chat(ours, messages, "chatml", add_generation_prompt=True)[0]
    out = model.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=False)
    assert out[0, :len(ids)].tolist() == ids and len(ids) < out.shape[1] <= len(ids) + 3


def test_gguf_takes_template_and_bos(trained, tmp_path):
    """llama.cpp's converter takes the chat template, add_bos_token/add_eos_token and the special token ids
    from gguf-py's SpecialVocab(folder) and writes them with SpecialVocab.add_to_gguf: from our merged/ they
    must arrive in the GGUF's tokenizer.* fields."""
    import gguf  # llama.cpp's gguf-py (PyPI 'gguf'), in the [test] extra: without it this fails, never skips
    n_vocab = json.loads((trained / "merged" / "config.json").read_text())["vocab_size"]
    sv = gguf.SpecialVocab(trained / "merged", n_vocab=n_vocab)
    writer = gguf.GGUFWriter(tmp_path / "vocab.gguf", "llama")
    sv.add_to_gguf(writer, quiet=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    fields = gguf.GGUFReader(tmp_path / "vocab.gguf").fields
    assert fields["tokenizer.chat_template"].contents() == CHAT_TEMPLATES["chatml"]
    assert fields["tokenizer.ggml.add_bos_token"].contents() is True
    assert fields["tokenizer.ggml.add_eos_token"].contents() is False
    assert [fields[f"tokenizer.ggml.{t}_token_id"].contents() for t in ("bos", "eos", "unknown")] == [1, 2, 0]
