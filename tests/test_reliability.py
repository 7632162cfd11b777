"""Failure modes of train.py: bad input exits 2 with one clear paragraph and writes nothing; SIGKILL at any
moment (also mid-save) loses at most the steps since the last checkpoint and a resumed run equals an
uninterrupted one bit for bit; SIGTERM saves first; non-finite steps are skipped, then abort; the disk is
checked; the data loader survives fuzzing."""
import json
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from llama import Tokenizer, corpus
from llama.data import DataError

DEMO_TOK = train.DEMO / "tiny-llama" / "tokenizer.model"


@pytest.fixture
def ckpt(tiny_train_ckpt):
    return tiny_train_ckpt


def args(ckpt, out, *extra):
    return ["--ckpt", str(ckpt), "--data", str(ckpt / "data.jsonl"), "--out", str(out), "--seq-len", "32",
            "--batch-size", "2", "--grad-accum", "2", "--lr", "3e-3", "--lora-dropout", "0.1", "--quant", "none",
            *extra]


def cli(argv, **kw):
    return subprocess.run([sys.executable, "train.py", *argv], cwd=train.ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300, **kw)


# ---- bad input: exit 2, one paragraph, no traceback, nothing written


def bad_inputs(ckpt: Path, tmp: Path) -> dict[str, tuple[list[str], str]]:
    trunc = tmp / "trunc"
    trunc.mkdir()
    for f in ckpt.iterdir():
        (trunc / f.name).write_bytes(f.read_bytes())
    pth = trunc / "consolidated.00.pth"
    pth.write_bytes(pth.read_bytes()[: pth.stat().st_size // 2])
    noparams = tmp / "noparams"
    noparams.mkdir()
    for f in ("consolidated.00.pth", "tokenizer.model"):
        (noparams / f).write_bytes((ckpt / f).read_bytes())
    badparams = tmp / "badparams"
    badparams.mkdir()
    for f in ckpt.iterdir():
        (badparams / f.name).write_bytes(f.read_bytes())
    p = json.loads((ckpt / "params.json").read_text())
    p["dim"] = 96  # disagrees with the weights
    (badparams / "params.json").write_text(json.dumps(p))
    vocab = tmp / "vocab"  # the tokenizer has 300 more tokens than the embedding has rows
    vocab.mkdir()
    for f in ckpt.iterdir():
        if f.name != "data.jsonl":
            (vocab / f.name).write_bytes(f.read_bytes())
    (vocab / "added_tokens.json").write_text(json.dumps({f"<extra_{i}>": 1024 + i for i in range(300)}))
    data = tmp / "d.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{oops\n')
    empty = tmp / "empty.jsonl"
    empty.write_text("")
    role = tmp / "role.jsonl"
    role.write_text('{"messages": [{"role": "wizard", "content": "hi"}]}\n')
    other_run = tmp / "other_run"
    other_run.mkdir()
    (other_run / "run_config.json").write_text("{}")
    tok = Tokenizer(ckpt / "tokenizer.model")
    opts = corpus.DataOptions(seq_len=32)
    short = tmp / "prepared_short"  # ids.npy lost its last token
    corpus.prepare_corpus([str(ckpt / "data.jsonl")], tok, short, opts, workers=1)
    ids = np.load(short / "train" / "ids.npy")
    np.save(short / "train" / "ids.npy", ids[:-1])
    other = tmp / "prepared_other_tok"  # written by a tokenizer with two more tokens
    tok2 = Tokenizer(ckpt / "tokenizer.model")
    tok2.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    corpus.prepare_corpus([str(ckpt / "data.jsonl")], tok2, other, opts, workers=1)
    base = lambda c, d=ckpt / "data.jsonl": ["--ckpt", str(c), "--data", str(d), "--max-steps", "1"]  # noqa: E731
    return {
        "truncated pth": (base(trunc), "consolidated.00.pth"),
        "missing params.json": (base(noparams), "params.json"),
        "shape disagrees": (base(badparams), "tok_embeddings.weight has shape (1024, 64), but the config implies (1024, 96)"),
        "missing folder": (base(tmp / "nope"), "nope"),
        "tokenizer disagrees with embedding": (base(vocab), "has 1324 tokens (300 from added_tokens.json), but the checkpoint in"),
        "bad json line": (base(ckpt, data), "d.jsonl:2"),
        "empty data": (base(ckpt, empty), "no training samples"),
        "unknown role": (base(ckpt, role), "role.jsonl:1: message 0 has unknown role 'wizard'"),
        "prepared arrays disagree": (base(ckpt, short) + ["--seq-len", "32"], f"prepared data {short}: the train arrays disagree"),
        "prepared by another tokenizer": (base(ckpt, other) + ["--seq-len", "32"], f"prepared data {other} was tokenized with another tokenizer"),
        "seq-len too long": (base(ckpt) + ["--seq-len", "8192"], "--seq-len 8192 is longer than the model supports"),
        "out holds another run": (base(ckpt) + ["--out", str(other_run)], "from another run"),
    }


@pytest.mark.slow
def test_bad_input_exits_2_with_clear_message_and_writes_nothing(tmp_path, ckpt):
    for name, (argv, expect) in bad_inputs(ckpt, tmp_path).items():
        out = tmp_path / f"out-{name.replace(' ', '_')}"
        if "--out" not in argv:
            argv = argv + ["--out", str(out)]
        r = cli(argv)
        assert r.returncode == 2, (name, r.stdout[-800:], r.stderr[-800:])
        assert expect in r.stderr and "Traceback" not in r.stderr, (name, r.stderr)
        assert r.stderr.startswith("error: "), (name, r.stderr)
        if "--out" in argv and name != "out holds another run":
            assert not out.exists(), name


# ---- crashes


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def adapter_bytes(out: Path) -> bytes:
    return (out / "adapter" / "adapter_model.safetensors").read_bytes()


KILL_MID_SAVE = """
import os, signal, sys, train, llama.files
real = llama.files.fsync_dir
def die_in_save(path):  # checkpoint-4's files are written but the folder is not renamed yet
    if '.tmp-checkpoint-4' in str(path):
        os.kill(os.getpid(), signal.SIGKILL)
    real(path)
llama.files.fsync_dir = die_in_save
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_equals_uninterrupted(tmp_path, ckpt):
    steps = ["--max-steps", "6", "--save-every", "2", "--quant", "nf4"]  # QLoRA here; the SIGTERM test runs LoRA
    ref = tmp_path / "ref"
    assert cli(args(ckpt, ref, *steps)).returncode == 0

    # 1) killed while writing checkpoint-4: the temp folder is ignored, checkpoint-2 is the one resumed
    out = tmp_path / "killed"
    r = subprocess.run([sys.executable, "-c", KILL_MID_SAVE, *args(ckpt, out, *steps)], cwd=train.ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL
    assert train.list_checkpoints(out) == [2] and list(out.glob(".tmp-checkpoint-4-*"))
    # 2) killed at a random moment of a resumed run, twice
    rng = random.Random(0)
    for _ in range(2):
        p = subprocess.Popen([sys.executable, "train.py", *args(ckpt, out, *steps, "--resume")], cwd=train.ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(1.0, 4.0))
        p.send_signal(signal.SIGKILL)
        p.wait()
    r = cli(args(ckpt, out, *steps, "--resume"))
    assert r.returncode == 0 and "data: reusing" in r.stdout  # the prepared corpus, not a second tokenization
    assert [m["loss"] for m in metrics(out)] == [m["loss"] for m in metrics(ref)]
    assert adapter_bytes(out) == adapter_bytes(ref)


class Crash(Exception):
    """What the test raises inside a run to stop it mid-training, as a crash would."""


@pytest.mark.parametrize("cpu_bf16, dtype", [("0", "fp32"), ("1", "bf16")])
def test_crash_then_resume_equals_uninterrupted_in_process(tmp_path, ckpt, monkeypatch, one_thread, cpu_bf16, dtype):
    """The fast form of the SIGKILL test: LoRA with dropout on, checkpoints every 2 steps; a run that dies in step
    6 (steps 1-5 logged, checkpoint-4 the last) and is then resumed to step 8 logs the uninterrupted run's losses
    and writes its adapter byte for byte. The resume must restore the adapter weights, AdamW's moments and
    step count, every RNG (dropout masks) and drop the metrics lines logged after the checkpoint. In the dtype
    --dtype auto picks on a CPU without native bf16 (fp32) and on one with it (bf16)."""
    monkeypatch.setenv("LLAMA_CPU_BF16", cpu_bf16)
    steps = ["--max-steps", "8", "--save-every", "2", "--save-total-limit", "3"]
    ref = tmp_path / "ref"
    assert train.main(args(ckpt, ref, *steps)) == 0
    assert json.loads((ref / "run_config.json").read_text())["dtype"] == dtype

    real, calls = train.loss_sum, {"n": 0}

    def crash_in_step_6(*a, **kw):  # --grad-accum 2: two micro-batches per step
        calls["n"] += 1
        if calls["n"] == 2 * 5 + 1:
            raise Crash
        return real(*a, **kw)

    out = tmp_path / "crashed"
    monkeypatch.setattr(train, "loss_sum", crash_in_step_6)
    with pytest.raises(Crash):
        train.main(args(ckpt, out, *steps))
    monkeypatch.setattr(train, "loss_sum", real)
    assert train.list_checkpoints(out) == [2, 4] and [m["step"] for m in metrics(out)] == [1, 2, 3, 4, 5]
    assert train.main(args(ckpt, out, *steps, "--resume")) == 0
    losses = [m["loss"] for m in metrics(out)]
    assert [m["step"] for m in metrics(out)] == list(range(1, 9)) and len(set(losses)) == 8
    assert losses == [m["loss"] for m in metrics(ref)]
    assert adapter_bytes(out) == adapter_bytes(ref)


class _RunsCode:
    """Unpickling this calls Path.touch(marker): what a tampered checkpoint would make a plain torch.load do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_tampered_checkpoint_state_does_not_run_code(tmp_path, ckpt, capsys):
    out = tmp_path / "run"
    assert train.main(args(ckpt, out, "--max-steps", "2", "--save-every", "1")) == 0
    state = out / "checkpoint-2" / "state.pt"
    # the RNG and optimizer state are tensors and plain containers: a weights_only load reads them
    assert set(torch.load(state, weights_only=True)) >= {"step", "rng", "model", "optimizer"}
    marker = tmp_path / "code-ran"
    torch.save({"step": 2, "rng": _RunsCode(marker)}, state)
    with pytest.raises(Exception):  # what the old weights_only=False load would have done: run the callable
        torch.load(state, weights_only=True)
    assert not marker.exists()
    assert train.main(args(ckpt, out, "--max-steps", "3", "--save-every", "1", "--resume")) == 2
    err = capsys.readouterr().err
    assert not marker.exists() and str(state) in err and err.startswith("error: ") and "Traceback" not in err
    torch.load(state, weights_only=False)  # the file really carries the callable: loading it unsafely runs it
    assert marker.exists()


def test_fsdp_checkpoint_metadata_is_checked_before_dcp_unpickles_it(tmp_path):
    """FSDP checkpoints go through torch.distributed.checkpoint, whose .metadata is a plain pickle: a real one
    passes train.check_dcp_metadata, one carrying a callable is refused without running it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model = torch.nn.Linear(4, 4).to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4, dtype=torch.bfloat16)).float().sum().backward()
    opt.step()
    msd, osd = get_state_dict(model, opt)
    with warnings.catch_warnings():  # no process group: dcp says it saves as one process
        warnings.simplefilter("ignore")
        dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(tmp_path / "dcp"))
    meta = tmp_path / "dcp" / ".metadata"
    train.check_dcp_metadata(meta)
    marker = tmp_path / "code-ran"
    meta.write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(train.CheckpointError, match=re.escape(f"{meta}: not checkpoint metadata")):
        train.check_dcp_metadata(meta)
    assert not marker.exists()


@pytest.mark.slow
def test_sigterm_saves_then_resume_equals_uninterrupted(tmp_path, ckpt):
    steps = ["--max-steps", "40"]
    ref = tmp_path / "ref"
    assert cli(args(ckpt, ref, *steps)).returncode == 0
    out = tmp_path / "term"
    p = subprocess.Popen([sys.executable, "train.py", *args(ckpt, out, *steps)], cwd=train.ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in p.stdout:  # wait until training runs, then ask it to stop
        if line.startswith("step 3/"):
            p.send_signal(signal.SIGTERM)
    assert p.wait() == 130
    saved = train.list_checkpoints(out)
    assert len(saved) == 1 and 3 <= saved[0] < 40
    assert cli(args(ckpt, out, *steps, "--resume")).returncode == 0
    assert [m["loss"] for m in metrics(out)] == [m["loss"] for m in metrics(ref)]
    assert adapter_bytes(out) == adapter_bytes(ref)


# ---- numerics and disk


@pytest.mark.slow
def test_non_finite_step_is_skipped_then_run_aborts(tmp_path, ckpt, monkeypatch, capsys):
    real, calls = train.loss_sum, {"n": 0}

    def nan_on_third_micro_batch(*a, **kw):
        calls["n"] += 1
        loss = real(*a, **kw)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(train, "loss_sum", nan_on_third_micro_batch)
    assert train.main(args(ckpt, tmp_path / "a", "--max-steps", "4")) == 0
    m = metrics(tmp_path / "a")
    assert [x["step"] for x in m] == [1, 2, 3, 4] and m[1]["skipped"] and m[1]["loss"] is None
    assert all(x["loss"] is not None for x in (m[0], m[2], m[3]))

    monkeypatch.setattr(train, "loss_sum", lambda *a, **kw: real(*a, **kw) * float("nan"))
    assert train.main(args(ckpt, tmp_path / "b", "--max-steps", "10", "--max-bad-steps", "3")) == 2
    err = capsys.readouterr().err
    assert "3 non-finite steps in a row at step 3" in err


def test_disk_too_small_is_refused_before_writing(tmp_path, ckpt, monkeypatch, capsys):
    monkeypatch.setattr(train.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    out = tmp_path / "o"
    assert train.main(args(ckpt, out, "--max-steps", "2", "--save-every", "1")) == 2
    assert "free on disk" in capsys.readouterr().err and not out.exists()


# ---- fuzzing the data loader


def test_fuzz_data_loader_never_tracebacks(tmp_path):
    tok = Tokenizer(str(DEMO_TOK))
    rng = random.Random(1234)
    good = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            {"instruction": "Say hi", "input": "", "output": "hi"},
            {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}]
    alphabet = "abc {}[]\":,\\\n\t\u00e9\u4e2d\U0001F600" + "".join(map(chr, range(32, 127)))
    deadline = time.time() + 20
    n = 0
    while time.time() < deadline and n < 300:
        n += 1
        lines = []
        for _ in range(rng.randint(1, 6)):
            kind = rng.random()
            row = json.dumps(rng.choice(good))
            if kind < 0.3:
                row = row[: rng.randint(0, len(row))]  # truncated JSON
            elif kind < 0.5:
                row = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))  # noise
            elif kind < 0.8:  # valid JSON, random content / roles / token soup
                text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
                role = rng.choice(["user", "assistant", "system", "bot", "", None])
                row = json.dumps({"messages": [{"role": role, "content": text},
                                               {"role": "assistant", "content": tok.decode(
                                                   [rng.randrange(tok.n_words) for _ in range(rng.randint(0, 20))])}]})
            lines.append(row)
        p = tmp_path / f"f{n}.jsonl"
        p.write_text("\n".join(lines) + "\n")
        cfg = train.TrainConfig(data=[str(p)], seq_len=rng.choice([8, 16, 64]), overlong=rng.choice(["drop", "truncate"]))
        dest = tmp_path / f"c{n}"
        try:
            meta = corpus.prepare_corpus(cfg.data, tok, dest, train.data_options(cfg), workers=1)
        except DataError as e:
            assert str(p) in str(e) or "no training samples" in str(e)
            assert not dest.exists()
            continue
        s = meta["stats"]["files"][str(p)]
        # nothing dropped silently: every row is accepted, held out or counted as skipped
        assert s["accepted"] + s["val"] + sum(s["skipped"].values()) == s["rows"] == len([x for x in lines if x.strip()])
        tr = corpus.open_corpus(dest)[1]["train"]
        assert len(tr) == s["accepted"] and tr.lengths.max() <= cfg.seq_len
