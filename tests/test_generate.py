"""Generation: KV-cache decoding against recomputing the whole forward each step, nucleus sampling against
hand-computed distributions, stop tokens, streaming text, and the `python -m llama.generate` CLI end to end."""
import io
import json
import math
import sys

import pytest
import torch

from conftest import train_sentencepiece
import llama.generate as gen
from llama import save_model
from llama.chat import encode_chat
from llama.generate import TextStream, generate, main, top_p_filter
from llama.model import ModelArgs, Transformer
from llama.tokenizer import Tokenizer

def tiny_model(vocab_size: int, seed: int = 0, max_seq_len: int = 64) -> Transformer:
    torch.manual_seed(seed)
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, multiple_of=16,
                     ffn_dim_multiplier=None, norm_eps=1e-5, rope_theta=10000.0, max_seq_len=max_seq_len)
    model = Transformer(args)
    with torch.no_grad():  # weights large enough that logits are well spread (no near-ties for argmax)
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]) * (4.0 if name == "output.weight" else 1.0))
    return model.eval()


@torch.no_grad()
def greedy_reference(model, prompt: list[int], n: int, stop: set[int] = frozenset()) -> list[int]:
    """No cache, batch of one: the whole sequence through the model at every step."""
    ids = list(prompt)
    for _ in range(n):
        if len(ids) >= model.args.max_seq_len:
            break
        t = int(model(torch.tensor([ids]))[0, -1].argmax())
        if t in stop:
            break
        ids.append(t)
    return ids[len(prompt):]


PROMPTS = [[1, 5, 9], [1, 17, 4, 33, 8, 2, 71], [1, 3, 3, 3, 90, 45, 12, 11, 7, 6, 5, 99]]


def test_kv_cache_matches_full_recompute():
    model = tiny_model(128)
    got = generate(model, PROMPTS, max_new_tokens=12)
    assert got == [greedy_reference(model, p, 12) for p in PROMPTS]
    assert all(len(g) == 12 for g in got)


def test_top_p_to_zero_is_greedy():
    model = tiny_model(128)
    torch.manual_seed(0)
    assert generate(model, PROMPTS, 10, temperature=1.0, top_p=1e-6) == generate(model, PROMPTS, 10)


def test_top_p_filter_hand_computed():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    # sorted: 0.5, 0.3, 0.15, 0.05; mass before each: 0, 0.5, 0.8, 0.95
    torch.testing.assert_close(top_p_filter(probs.clone(), 0.7), torch.tensor([[0.0, 0.625, 0.0, 0.375]]))
    torch.testing.assert_close(top_p_filter(probs.clone(), 0.85), torch.tensor([[0.15, 0.5, 0.0, 0.3]]) / 0.95)
    torch.testing.assert_close(top_p_filter(probs.clone(), 0.0), torch.tensor([[0.0, 1.0, 0.0, 0.0]]))


def test_sampling_follows_softmax_with_temperature_and_nucleus():
    """4000 one-token samples of one prompt: the frequencies match softmax(logits / T), nucleus-filtered."""
    model = tiny_model(16, seed=3)
    prompt = [1, 4, 7]
    logits = model(torch.tensor([prompt]))[0, -1].detach()
    n = 4000
    for temperature, top_p in [(0.7, 1.0), (1.5, 0.6)]:
        want = torch.softmax(logits / temperature, -1)
        want = top_p_filter(want[None].clone(), top_p)[0]
        torch.manual_seed(1)
        out = generate(model, [prompt] * n, 1, temperature=temperature, top_p=top_p)
        freq = torch.bincount(torch.tensor([o[0] for o in out]), minlength=16).float() / n
        assert (freq[want == 0] == 0).all()  # nothing outside the nucleus
        assert 0.5 * (freq - want).abs().sum() < 0.04  # total variation; sampling noise is ~0.015


def test_stop_ids_and_on_token():
    model = tiny_model(128)
    full = [greedy_reference(model, p, 12) for p in PROMPTS]
    # Stop the second prompt at the first token of its greedy continuation not seen before position 3.
    k = next(i for i in range(3, 12) if full[1][i] not in full[1][:i])
    stop = full[1][k]
    seen: list[tuple[int, int]] = []
    got = generate(model, PROMPTS, 12, stop_ids=[stop], on_token=lambda b, t: seen.append((b, t)))
    assert got == [greedy_reference(model, p, 12, {stop}) for p in PROMPTS]
    assert got[1] == full[1][:k]
    assert [[t for b, t in seen if b == i] for i in range(3)] == got


def test_max_seq_len_caps_generation():
    model = tiny_model(128, max_seq_len=16)
    got = generate(model, [[1, 2, 3], list(range(1, 13))], 10)
    assert [len(g) for g in got] == [10, 4]
    assert got[1] == greedy_reference(model, list(range(1, 13)), 10)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, [list(range(1, 17))], 1)


def test_vocab_size_limits_sampling():
    model = tiny_model(128)
    with torch.no_grad():
        model.output.weight[100:] = 0
        model.output.weight[100:, 0] = 1000.0  # rows past the "tokenizer" win every argmax...
    got = generate(model, PROMPTS, 5, vocab_size=100)
    assert all(t < 100 for g in got for t in g)  # ...unless sampling is restricted


@pytest.fixture(params=["tiny", "llama2"])
def tokenizer(request, tmp_path):
    if request.param == "tiny":
        return Tokenizer(train_sentencepiece(tmp_path))
    return Tokenizer(request.getfixturevalue("llama2_tokenizer_path"))


class Writes(list):
    """A stdout that keeps each write apart: the pieces of text a stream shows, in order."""

    def write(self, text: str) -> None:
        self.append(text)

    def flush(self) -> None:
        pass


def test_text_stream_reproduces_text(tokenizer, monkeypatch):
    text = "Hello world!  Two spaces, a newline\nand ü€😀 at the end x"
    writes = Writes()
    monkeypatch.setattr(sys, "stdout", writes)
    stream = TextStream(tokenizer)
    for t in tokenizer.encode(text):
        stream(0, t)
    assert stream.finish() == text and "".join(writes) == text
    assert not any("\ufffd" in w for w in writes)
    # Token by token, SentencePiece loses the spaces: what the stream is there to avoid.
    assert "".join(tokenizer.decode([t]) for t in tokenizer.encode(text)) != text


def test_text_stream_on_random_tokens(tokenizer, monkeypatch):
    """Whatever a model emits (broken byte sequences included), the writes add up to the decoded text."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, tokenizer.n_words, (200,), generator=g).tolist()
    writes = Writes()
    monkeypatch.setattr(sys, "stdout", writes)
    stream = TextStream(tokenizer)
    for t in ids:
        stream(0, t)
    assert stream.finish() == tokenizer.decode(ids) == "".join(writes)


# ---------------------------------------------------------------------------------------------------------
# CLI


@pytest.fixture
def ckpt(tmp_path):
    """A tiny Meta-layout checkpoint with its tokenizer."""
    (tmp_path / "tok").mkdir()
    tok_path = train_sentencepiece(tmp_path / "tok")
    model = tiny_model(Tokenizer(tok_path).n_words, max_seq_len=128)
    save_model(model, tmp_path / "ckpt", layout="meta", tokenizer=tok_path)
    return tmp_path / "ckpt", model


def test_cli_prompt(ckpt, capsys):
    folder, model = ckpt
    tok = Tokenizer(folder / "tokenizer.model")
    main(["--ckpt", str(folder), "--template", "llama2", "--system", "Be brief.", "--prompt", "What is the capital?",
          "--temperature", "0", "--max-new-tokens", "20"])
    prompt, _ = encode_chat(tok, [{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": "What is the capital?"}], "llama2", add_generation_prompt=True)
    want = tok.decode(greedy_reference(model, prompt, 20, {tok.eos_id}))
    assert capsys.readouterr().out == want + "\n"


def spy_generate(monkeypatch) -> tuple[list, list]:
    """Records the prompt ids each reply is generated from, and the ids generated."""
    prompts, outputs = [], []
    real = gen.generate

    def spy(model, p, *a, **k):
        prompts.append(p[0])
        outputs.append(real(model, p, *a, **k)[0])
        return outputs[-1:]

    monkeypatch.setattr(gen, "generate", spy)
    return prompts, outputs


def test_cli_chat_loop_keeps_history(ckpt, monkeypatch, capsys):
    folder, _ = ckpt
    prompts, outputs = spy_generate(monkeypatch)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\nAnd then?\n\nnever read\n"))
    main(["--ckpt", str(folder), "--template", "tulu", "--temperature", "0", "--max-new-tokens", "8"])
    assert len(prompts) == 2  # the empty line ended the chat
    tok = Tokenizer(folder / "tokenizer.model")
    out = capsys.readouterr().out
    assert all(tok.decode(o) in out for o in outputs)
    # The second prompt carries the first exchange: the user's line and the reply.
    history = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": tok.decode(outputs[0])},
               {"role": "user", "content": "And then?"}]
    assert prompts[1] == encode_chat(tok, history, "tulu", add_generation_prompt=True)[0]


def test_cli_chat_reset_keeps_the_system_prompt_and_exit_quits(ckpt, monkeypatch, capsys):
    folder, _ = ckpt
    prompts, outputs = spy_generate(monkeypatch)
    lines = "Hello there\nAnd then?\n/reset\nWhat now?\nOne more\n /exit \nnever read\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    assert main(["--ckpt", str(folder), "--system", "Be brief.", "--temperature", "0", "--max-new-tokens", "6"]) == 0
    tok = Tokenizer(folder / "tokenizer.model")
    system = {"role": "system", "content": "Be brief."}
    user = lambda text: {"role": "user", "content": text}  # noqa: E731
    said = lambda i: {"role": "assistant", "content": tok.decode(outputs[i])}  # noqa: E731
    want = [[system, user("Hello there")], [system, user("Hello there"), said(0), user("And then?")],
            [system, user("What now?")], [system, user("What now?"), said(2), user("One more")]]
    assert all(o for o in outputs)  # every reply joined the history (an empty one would not)
    assert prompts == [encode_chat(tok, m, "llama2", add_generation_prompt=True)[0] for m in want]
    assert "(conversation cleared; the system prompt is kept)" in capsys.readouterr().out


def test_cli_chat_no_history_answers_each_message_alone(ckpt, monkeypatch):
    folder, _ = ckpt
    prompts, _ = spy_generate(monkeypatch)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\nAnd then?\n"))  # ends at the end of input
    main(["--ckpt", str(folder), "--template", "tulu", "--no-history", "--temperature", "0", "--max-new-tokens", "6"])
    tok = Tokenizer(folder / "tokenizer.model")
    assert prompts == [encode_chat(tok, [{"role": "user", "content": q}], "tulu", add_generation_prompt=True)[0]
                       for q in ("Hello there", "And then?")]


def test_chat_flags_and_their_defaults():
    """The flags train.py --chat shares with python -m llama.generate; the defaults are Meta's (0.6, 0.9)."""
    import argparse
    p = argparse.ArgumentParser()
    gen.add_chat_args(p)
    assert gen.chat_options(p.parse_args([])) == gen.ChatOptions(system=None, max_new_tokens=512, temperature=0.6,
                                                                 top_p=0.9, no_history=False)
    args = p.parse_args(["--system", "S", "--max-new-tokens", "7", "--temperature", "0", "--top-p", "0.5",
                         "--no-history"])
    assert gen.chat_options(args) == gen.ChatOptions("S", 7, 0.0, 0.5, True)


@pytest.mark.parametrize("flag, value", [("--top-p", "0"), ("--top-p", "1.5"), ("--temperature", "-1"),
                                         ("--max-new-tokens", "0")])
def test_cli_flag_out_of_range(ckpt, capsys, flag, value):
    folder, _ = ckpt
    assert main(["--ckpt", str(folder), "--prompt", "hi", flag, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {flag} must be") and err.count("\n") == 1


def test_cli_template_needs_tokens(ckpt, capsys):
    folder, _ = ckpt
    assert main(["--ckpt", str(folder), "--template", "chatml", "--prompt", "hi"]) == 2
    assert "needs the special tokens" in capsys.readouterr().err


@pytest.mark.parametrize("base_in", ["adapter_config", "run_config", "nowhere"])
def test_cli_adapter_folder_says_how_to_chat_with_it(tmp_path, capsys, base_in):
    """An adapter folder has no model to load: the error says to use train.py --chat with its base."""
    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    config = {"peft_type": "LORA", "base_model_name_or_path": "/models/base" if base_in == "adapter_config" else None}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    if base_in == "run_config":
        (tmp_path / "run" / "run_config.json").write_text(json.dumps({"ckpt": "/models/base", "template": "llama2"}))
    assert main(["--ckpt", str(adapter)]) == 2
    err = capsys.readouterr().err
    base = "BASE" if base_in == "nowhere" else "/models/base"
    assert err.startswith(f"error: {adapter} is a LoRA adapter, not a model; chat with it through "
                          f"`python train.py --chat --ckpt {base} --adapter {adapter}`")
    assert err.count("\n") == 1
