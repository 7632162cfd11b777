"""The tokenized corpus on disk (llama.corpus) and train.py's use of it: arrays against encode_chat, worker
count, best-fit-decreasing against a plain reference, the key (reuse, content change, --resume mismatch), a
prepared folder as --data, what --show-samples marks."""
import json
import os
import random
import re
import shutil

import numpy as np
import pytest

import train
from llama import Tokenizer, corpus
from llama.chat import encode_chat
from llama.data import DataError

DEMO_TOK = train.DEMO / "tiny-llama" / "tokenizer.model"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(str(DEMO_TOK))


def dialogs(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = "the cat sat on a mat while it rained and we talked about cold hot up down".split()
    out = []
    for i in range(n):
        msgs = [{"role": "system", "content": "Be brief."}] if i % 3 == 0 else []
        for _ in range(rng.randint(1, 3)):
            msgs += [{"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(1, 30)))},
                     {"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(1, 40)))}]
        out.append({"messages": msgs})
    return out


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_split(folder, name="train"):
    return {k: np.load(folder / name / f"{k}.npy") for k in corpus.ARRAYS}


def test_arrays_equal_encode_chat_in_shuffled_order(tmp_path, tok):
    rows = dialogs(300)
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    meta = corpus.prepare_corpus([str(p)], tok, tmp_path / "c", corpus.DataOptions(seq_len=256, seed=7),
                                 workers=1)
    # reference: the rows in random.Random(seed).shuffle order, each through encode_chat, truncated to seq_len
    order = list(range(len(rows)))
    random.Random(7).shuffle(order)
    want = [encode_chat(tok, rows[i]["messages"], "llama2") for i in order]
    want = [(ids[:256], mask[:256]) for ids, mask in want]
    a = read_split(tmp_path / "c")
    assert a["ids"].dtype == np.int32 and a["mask"].dtype == np.uint8 and a["offsets"].dtype == np.int64
    assert a["ids"].tolist() == [t for ids, _ in want for t in ids]
    assert a["mask"].tolist() == [int(m) for _, mask in want for m in mask]
    assert np.diff(a["offsets"]).tolist() == [len(ids) for ids, _ in want]
    assert a["targets"].tolist() == [sum(mask[1:]) for _, mask in want]
    assert meta["stats"]["total"]["truncated"] == sum(len(encode_chat(tok, r["messages"], "llama2")[0]) > 256 for r in rows)
    assert meta["stats"]["total"]["tokens"] == len(a["ids"])
    # training reads it memory-mapped
    _, splits = corpus.open_corpus(tmp_path / "c")
    assert isinstance(splits["train"].ids, np.memmap) and isinstance(splits["train"].mask, np.memmap)


@pytest.mark.parametrize("template", ["llama2", "chatml"])
def test_worker_count_does_not_change_the_arrays(tmp_path, monkeypatch, template):
    monkeypatch.setattr(corpus, "CHUNK_ROWS", 16)  # many chunks, so several workers really share the work
    tok = Tokenizer(str(DEMO_TOK))
    if template == "chatml":  # added tokens: each worker must give them the caller's ids
        tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    p = write_jsonl(tmp_path / "d.jsonl", dialogs(200))
    q = write_jsonl(tmp_path / "e.jsonl", dialogs(90, seed=1))
    opts = corpus.DataOptions(template=template, seq_len=128, val_split=0.1, max_val=15, seed=3, overlong="drop")
    metas = []
    for w in (1, 2, 3):
        metas.append(corpus.prepare_corpus([f"{p}:0.8", str(q)], tok, tmp_path / f"w{w}", opts, workers=w))
    assert metas[0]["stats"]["total"]["skipped"]  # the drop filter did something
    if template == "chatml":
        assert tok.special_tokens["<|im_end|>"] in np.load(tmp_path / "w1" / "train" / "ids.npy")
    for w in (2, 3):
        assert metas[w - 1] == metas[0]
        for split in ("train", "val"):
            for k in corpus.ARRAYS:
                a = np.load(tmp_path / "w1" / split / f"{k}.npy")
                assert np.array_equal(a, np.load(tmp_path / f"w{w}" / split / f"{k}.npy")), (w, split, k)


def test_bad_row_in_a_worker_names_the_row_and_leaves_no_folder(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(corpus, "CHUNK_ROWS", 8)
    rows = dialogs(60)
    rows[37] = {"messages": [{"role": "assistant", "content": "first"}]}  # llama2 needs a user turn first
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=re.escape(f"{p}:38: message 0 is 'assistant'")):
        corpus.prepare_corpus([str(p)], tok, tmp_path / "c", corpus.DataOptions(seq_len=128), workers=2)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["d.jsonl"]


def test_no_sources_is_a_data_error(tmp_path, tok):
    with pytest.raises(DataError, match="no data sources given"):
        corpus.prepare_corpus([], tok, tmp_path / "c", corpus.DataOptions())
    assert not (tmp_path / "c").exists()


def bfd_reference(lengths, seq_len):
    """Best-fit decreasing written plainly: longest first (stable), into the fullest row that still fits
    (the first such row on ties), else a new row."""
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = [r for r in range(len(rows)) if room[r] >= lengths[i]]
        if fits:
            r = min(fits, key=lambda r: (room[r], r))
            rows[r].append(i)
            room[r] -= lengths[i]
        else:
            rows.append([i])
            room.append(seq_len - lengths[i])
    return rows


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pack_plan_is_best_fit_decreasing(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(1, 64), rng.randint(1, 16), 64, 32]) for _ in range(400)]
    starts, samples = corpus.pack_plan(np.array(lengths), 64)
    got = [samples[starts[r]: starts[r + 1]].tolist() for r in range(len(starts) - 1)]
    assert got == bfd_reference(lengths, 64)


def test_build_batch_against_hand_made_rows(tok):
    # two samples, [1, 5, 6, 7, 2] (trained from 6 on) and [1, 9, 2] (trained from 9 on), concatenated
    split = corpus.Split(ids=np.array([1, 5, 6, 7, 2, 1, 9, 2], np.int32),
                         mask=np.array([0, 0, 1, 1, 1, 0, 1, 1], np.uint8), offsets=np.array([0, 5, 8], np.int64), targets=np.array([3, 2], np.int32))
    rows = corpus.make_rows(split, 10, packing=True)
    b = corpus.build_batch(split, rows, [0], 10, pad_id=0)
    assert b["tokens"].tolist() == [[1, 5, 6, 7, 2, 1, 9, 2, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7, 2, -100, 9, 2, -100, -100, -100]]
    assert b["doc_ids"].tolist() == [[0, 0, 0, 0, 0, 1, 1, 1, 2, 2]]
    assert rows.targets.tolist() == [5]
    rows = corpus.make_rows(split, 10, packing=False)
    assert len(rows) == 2 and rows.targets.tolist() == [3, 2]


def test_open_corpus_rejects_disagreeing_arrays(tmp_path, tok):
    p = write_jsonl(tmp_path / "d.jsonl", dialogs(20))
    corpus.prepare_corpus([str(p)], tok, tmp_path / "c", corpus.DataOptions(seq_len=128), workers=1)
    offsets = np.load(tmp_path / "c" / "train" / "offsets.npy")
    np.save(tmp_path / "c" / "train" / "offsets.npy", offsets[:-1])
    with pytest.raises(DataError, match=re.escape(f"prepared data {tmp_path / 'c'}: the train arrays disagree")):
        corpus.open_corpus(tmp_path / "c")


# ---- train.py: --prepare-data, the key, a prepared folder as --data, --show-samples


def tok_only_ckpt(tmp_path):
    """A checkpoint folder with only tokenizer.model: --prepare-data must not need the weights."""
    d = tmp_path / "ckpt"
    d.mkdir()
    shutil.copy(DEMO_TOK, d / "tokenizer.model")
    return d


def test_prepare_data_key_reuse_content_change_and_resume_mismatch(tmp_path, capsys):
    ckpt = tok_only_ckpt(tmp_path)
    p = write_jsonl(tmp_path / "d.jsonl", dialogs(50))
    out = tmp_path / "out"
    argv = ["--ckpt", str(ckpt), "--data", str(p), "--out", str(out), "--seq-len", "128", "--prepare-data"]
    assert train.main(argv) == 0
    assert "data: prepared" in capsys.readouterr().out
    assert sorted(f.name for f in out.iterdir()) == ["data", "data_stats.json"]
    meta = json.loads((out / "data" / "meta.json").read_text())
    assert meta["key"]["sources"][0]["files"][0]["sha256"] == corpus.file_sha256(p)
    assert train.main(argv) == 0
    assert "data: reusing" in capsys.readouterr().out
    # the same size and modification time, one byte of content changed: the key sees it
    st = p.stat()
    p.write_text(p.read_text().replace("cat", "cut", 1))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert p.stat().st_size == st.st_size and p.stat().st_mtime_ns == st.st_mtime_ns
    # on --resume a corpus that no longer matches is an error, and it stays as it was
    before = (out / "data" / "train" / "ids.npy").read_bytes()
    assert train.main(argv[:-1] + ["--resume", "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume:") and "differ in: data files" in err
    assert (out / "data" / "train" / "ids.npy").read_bytes() == before
    assert train.main(argv + ["--seed", "1"]) == 0  # not resuming: prepared again
    assert "data: prepared" in capsys.readouterr().out
    assert json.loads((out / "data" / "meta.json").read_text())["key"]["seed"] == 1


def test_show_samples_marks_the_trained_span(tmp_path, tok, capsys):
    ckpt = tok_only_ckpt(tmp_path)
    msgs = [{"role": "user", "content": "What is the opposite of hot?"},
            {"role": "assistant", "content": "The opposite of hot is cold."}]
    p = write_jsonl(tmp_path / "d.jsonl", [{"messages": msgs}])
    assert train.main(["--ckpt", str(ckpt), "--data", str(p), "--out", str(tmp_path / "o"), "--seq-len", "128",
                       "--prepare-data", "--show-samples", "1"]) == 0
    shown = capsys.readouterr().out
    ids, mask = encode_chat(tok, msgs, "llama2")
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    spans = re.findall(r"\[\[(.*?)\]\]", shown, re.S)
    assert len(spans) == 1 and spans[0].endswith("</s>")  # the eos is trained and shown
    assert spans[0][: -len("</s>")].strip() == trained.strip() == "The opposite of hot is cold."
    # bos visible (then SentencePiece's dummy-prefix space), the prompt unmarked
    assert "<s> [INST] What is the opposite of hot? [/INST][[" in shown


CHATML_DIALOGS = [  # (system or None, [(user, assistant), ...])
    ("Be brief.", [("What is the opposite of hot?", "Cold."), ("And of up?", "Down, of course.")]),
    (None, [("Name a colour.", "Blue"), ("Another one?", "Red is another."), ("Thanks!", "You are welcome.")]),
    ("You answer in one word.", [("Capital of France?", "Paris"), ("Two plus two?", "Four")]),
    (None, [("hi", "Hello! How can I help you today?"), ("Write a short poem about the sea.",
                                                         "The sea is wide and deep and blue.")]),
    (None, [("Is the dog lazy?", "Yes, the quick brown fox jumps over it."), ("Why?", "It is tired."),
            ("ok", "ok")]),
]


def test_chatml_corpus_trains_exactly_the_replies_and_end_tokens(tmp_path):
    """ChatML on a base tokenizer (train.py adds <|im_start|> and <|im_end|>), multi-turn dialogs prepared by
    --prepare-data and packed into rows as training draws them: the trained labels of each packed document are
    exactly its assistant replies, each followed by <|im_end|> (strings written here), and each document
    (doc_ids) is exactly one dialog, in the ChatML text written here, starting with BOS."""
    rows = []
    for system, exchanges in CHATML_DIALOGS:
        msgs = [{"role": "system", "content": system}] if system else []
        for user, reply in exchanges:
            msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        rows.append({"messages": msgs})
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "out"
    assert train.main(["--ckpt", str(tok_only_ckpt(tmp_path)), "--data", str(p), "--out", str(out), "--template",
                       "chatml", "--seq-len", "256", "--prepare-data"]) == 0
    tok = Tokenizer(str(DEMO_TOK))
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    split = corpus.open_corpus(out / "data")[1]["train"]
    plan = corpus.make_rows(split, 256)
    batch = corpus.build_batch(split, plan, range(len(plan)), 256, pad_id=tok.eos_id)
    assert len(plan) < len(CHATML_DIALOGS)  # some rows hold several dialogs

    def chatml_text(system, exchanges):
        parts = [f"<|im_start|>system\n{system}<|im_end|>"] if system else []
        for user, reply in exchanges:
            parts += [f"<|im_start|>user\n{user}<|im_end|>", f"<|im_start|>assistant\n{reply}<|im_end|>"]
        return "\n".join(parts)

    want = sorted((chatml_text(sy, ex), tuple(r + "<|im_end|>" for _, r in ex)) for sy, ex in CHATML_DIALOGS)
    got = []
    for tokens, labels, doc_ids in zip(batch["tokens"].tolist(), batch["labels"].tolist(), batch["doc_ids"].tolist()):
        starts = [0] + [i for i in range(1, 256) if doc_ids[i] != doc_ids[i - 1]] + [256]
        for a, b in zip(starts[:-1], starts[1:]):
            doc, lab = tokens[a:b], labels[a:b]
            if doc[0] != tok.bos_id:  # the padded tail: nothing trained, nothing after it
                assert b == 256 and set(lab) == {-100}
                continue
            assert tok.bos_id not in doc[1:] and lab[-1] == -100  # one dialog; its last token predicts nothing
            runs, run = [], []  # consecutive trained labels: one reply and its end token each
            for x in lab + [-100]:
                if x != -100:
                    run.append(x)
                elif run:
                    runs.append(tok.decode(run))
                    run = []
            got.append((tok.decode(doc[1:]), tuple(runs)))
    assert sorted(got) == want


@pytest.mark.slow
def test_prepared_folder_trains_like_raw_files(tmp_path, tiny_train_ckpt):
    """--prepare-data on a CPU box, then --data <prepared folder>: the same losses as a run from the raw file,
    and the folder is used as it is (nothing prepared again in OUT)."""
    common = ["--ckpt", str(tiny_train_ckpt), "--seq-len", "64", "--batch-size", "4", "--grad-accum", "2",
              "--max-steps", "4", "--lr", "3e-3", "--quant", "none", "--val-split", "0.2", "--eval-every", "2"]
    raw = tiny_train_ckpt / "data.jsonl"
    assert train.main(common + ["--data", str(raw), "--out", str(tmp_path / "raw")]) == 0
    assert train.main(common + ["--data", str(raw), "--out", str(tmp_path / "prep"), "--prepare-data",
                                "--data-workers", "2"]) == 0
    assert train.main(common + ["--data", str(tmp_path / "prep" / "data"), "--out", str(tmp_path / "run")]) == 0
    lines = [[json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("raw", "run")]
    assert [(m["loss"], m.get("eval_loss")) for m in lines[0]] == [(m["loss"], m.get("eval_loss")) for m in lines[1]]
    assert any("eval_loss" in m for m in lines[0])
    assert not (tmp_path / "run" / "data").exists()
    # the folder prepared again with another seed: a --resume of that run refuses it
    assert train.main(common + ["--data", str(raw), "--out", str(tmp_path / "prep"), "--prepare-data",
                                "--seed", "1"]) == 0
    assert train.main(common + ["--data", str(tmp_path / "prep" / "data"), "--out", str(tmp_path / "run"),
                                "--resume"]) == 2


def oasst_rows(n_trees: int) -> list[dict]:
    """OASST message rows (the `*.messages.jsonl` schema): tree k = a prompt with two ranked replies, so two
    threads per tree."""
    rows = []
    for k in range(n_trees):
        common = {"message_tree_id": f"t{k}", "lang": "en", "review_result": True, "deleted": False,
                  "synthetic": False, "tree_state": "ready_for_export"}
        rows.append({"message_id": f"m{k}", "role": "prompter", "text": f"Question number {k}?", **common})
        for r in range(2):
            rows.append({"message_id": f"m{k}r{r}", "parent_id": f"m{k}", "role": "assistant", "rank": r,
                         "text": f"Answer {r} to question {k}.", **common})
    return rows


def trees_of(split, tok) -> list[int]:
    return [int(re.search(r"Question number (\d+)", tok.decode(split.sample(i)[0].tolist())).group(1))
            for i in range(len(split))]


def test_val_split_and_fraction_draw_whole_oasst_trees(tmp_path, tok):
    p = write_jsonl(tmp_path / "oasst.messages.jsonl", oasst_rows(40))
    corpus.prepare_corpus([str(p)], tok, tmp_path / "c", corpus.DataOptions(seq_len=128, val_split=0.3, seed=1),
                          workers=1)
    _, splits = corpus.open_corpus(tmp_path / "c")
    train_trees, val_trees = trees_of(splits["train"], tok), trees_of(splits["val"], tok)
    assert not set(train_trees) & set(val_trees)  # no tree on both sides
    assert sorted(train_trees + val_trees) == sorted(list(range(40)) * 2)  # both threads of every tree
    assert len(val_trees) == 24  # int(80 samples * 0.3) = 24: whole trees of two threads until that is reached
    corpus.prepare_corpus([f"{p}:0.5"], tok, tmp_path / "h", corpus.DataOptions(seq_len=128), workers=1)
    half = trees_of(corpus.open_corpus(tmp_path / "h")[1]["train"], tok)
    assert len(set(half)) == 20 and sorted(half) == sorted(list(set(half)) * 2)  # half the trees, whole


def test_text_rows_as_language_modelling(tmp_path, tok):
    p = write_jsonl(tmp_path / "t.jsonl", [{"text": "Once upon a time there was a cat."}])
    corpus.prepare_corpus([str(p)], tok, tmp_path / "c", corpus.DataOptions(seq_len=128, text_as_lm=True),
                          workers=1)
    a = read_split(tmp_path / "c")
    want = tok.encode("Once upon a time there was a cat.", bos=True, eos=True)  # every token trained
    assert a["ids"].tolist() == want and a["mask"].tolist() == [1] * len(want)
    assert a["targets"].tolist() == [len(want) - 1]


# ---- --bad-rows skip: broken rows among good ones are left out, counted and listed

BROKEN = [  # (a line, its reason), one per kind of bad row
    (b'{"messages": [{"role": "user", "content": "cut', "invalid_json"),
    (b'{"prompt": "x", "completion": "y"}', "unknown_format"),
    (b'{"messages": [{"role": "bot", "content": "x"}]}', "invalid_dialog"),
    (b'{"messages": [{"role": "assistant", "content": "first"}]}', "invalid_dialog"),  # llama2: a user turn first
    (b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]}]}',
     "invalid_dialog"),
]


def write_with_broken_rows(path, good: list[dict], at: list[int]) -> list[int]:
    """The good rows as JSON lines with BROKEN's lines inserted so that they land on lines `at` (1-based)."""
    lines = [json.dumps(r).encode() for r in good]
    for line_no, (line, _) in zip(at, BROKEN):
        lines.insert(line_no - 1, line)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return at


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_rows_skip_gives_the_corpus_of_the_good_rows(tmp_path, monkeypatch, tok, workers):
    monkeypatch.setattr(corpus, "CHUNK_ROWS", 16)  # many chunks: the bad rows fall into several
    good = dialogs(200)
    p = tmp_path / "mixed.jsonl"
    at = write_with_broken_rows(p, good, [1, 40, 41, 150, 205])
    q = write_jsonl(tmp_path / "good.jsonl", good)
    opts = corpus.DataOptions(seq_len=128, val_split=0.1, seed=3, bad_rows="skip", max_bad_fraction=0.05)
    meta = corpus.prepare_corpus([str(p)], tok, tmp_path / "skip", opts, workers=workers)
    want = corpus.prepare_corpus([str(q)], tok, tmp_path / "good", corpus.DataOptions(seq_len=128, val_split=0.1, seed=3),
                                 workers=1)
    for split in ("train", "val"):
        for k in corpus.ARRAYS:
            assert np.array_equal(read_split(tmp_path / "skip", split)[k], read_split(tmp_path / "good", split)[k]), k
    got, ref = meta["stats"]["total"], want["stats"]["total"]
    assert got["skipped"] == {"invalid_json": 1, "unknown_format": 1, "invalid_dialog": 3, **ref["skipped"]}
    assert got["rows"] == 205 and (got["accepted"], got["val"]) == (ref["accepted"], ref["val"])
    listed = [json.loads(x) for x in (tmp_path / "skip" / "skipped.jsonl").read_text().splitlines()]
    assert [(r["where"], r["reason"]) for r in listed] == [(f"{p}:{n}", why) for n, (_, why) in zip(at, BROKEN)]
    assert listed[1]["error"] == f"{p}:40: row has no recognisable format; expected {{\"messages\": [...]}}, " \
        "Alpaca {\"instruction\", \"input\", \"output\"}, ShareGPT {\"conversations\": [...]}, an OpenAssistant " \
        "message {\"message_id\", \"parent_id\", ...} or tree {\"message_tree_id\", \"prompt\"}, or {\"text\"}; " \
        "found keys ['completion', 'prompt']"
    assert listed[3]["error"].startswith(f"{p}:150: message 0 is 'assistant' where llama2 needs 'user'")
    assert listed[4]["error"] == f"{p}:205: message 0: content part 0 has type 'image_url'; only text parts can " \
        "be trained on ({\"type\": \"text\", \"text\": ...})"
    assert not (tmp_path / "good" / "skipped.jsonl").exists()
    # the options are in the key: a corpus prepared with skip is not one prepared with error
    key = corpus.corpus_key([str(p)], tok, opts)
    assert corpus.key_difference(meta["key"], key) == []
    assert corpus.key_difference(meta["key"], {**key, "bad_rows": "error"}) == ["bad_rows"]
    assert corpus.key_difference(meta["key"], {**key, "max_bad_fraction": 0.5}) == ["max_bad_fraction"]
    # a key written before these options existed holds their defaults
    old = {k: v for k, v in want["key"].items() if k not in ("bad_rows", "max_bad_fraction")}
    assert corpus.key_difference(old, want["key"]) == []


def test_bad_rows_skip_caps(tmp_path, monkeypatch, tok):
    p = tmp_path / "d.jsonl"
    write_with_broken_rows(p, dialogs(60), [3, 9])
    with pytest.raises(DataError, match=re.escape(
            f"{p}: 2 of its 62 rows are bad, more than --max-bad-fraction 0.01 allows: probably a wrong --template or "
            f"data format rather than a few broken rows. The first: {p}:3: not valid JSON")):
        corpus.prepare_corpus([str(p)], tok, tmp_path / "c", corpus.DataOptions(seq_len=128, bad_rows="skip"),
                              workers=1)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["d.jsonl"]
    # under the fraction: kept; skipped.jsonl lists only the first MAX_LISTED, the stats count them all
    monkeypatch.setattr(corpus, "MAX_LISTED", 1)
    meta = corpus.prepare_corpus([str(p)], tok, tmp_path / "c", corpus.DataOptions(
        seq_len=128, bad_rows="skip", max_bad_fraction=2 / 62), workers=1)
    assert meta["stats"]["total"]["skipped"] == {"invalid_json": 1, "unknown_format": 1}
    assert [json.loads(x)["where"] for x in (tmp_path / "c" / "skipped.jsonl").read_text().splitlines()] == [f"{p}:3"]


def test_bad_rows_skip_still_stops_at_whole_file_problems(tmp_path, tok):
    import gzip
    opts = corpus.DataOptions(seq_len=128, bad_rows="skip", max_bad_fraction=1)
    z = tmp_path / "cut.jsonl.gz"
    z.write_bytes(gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in dialogs(200)))[:-60])
    m = write_jsonl(tmp_path / "mixed.jsonl", dialogs(3) + [{"text": "[INST] q [/INST] a"}])
    a = tmp_path / "arr.json"
    a.write_text("[" + json.dumps(dialogs(1)[0]) + ", {\"messages\": [} ]")
    for path, expect in ((z, re.escape(f"{z}:") + r"\d+: cannot read the file: Compressed file ended"),
                         (m, re.escape(f"{m}:4: row is a text row but the file's first row")),
                         (a, re.escape(f"{a}:2: not valid JSON"))):
        with pytest.raises(DataError, match=expect):
            corpus.prepare_corpus([str(path)], tok, tmp_path / "c", opts, workers=1)
        assert not (tmp_path / "c").exists()


def test_prepare_data_bad_rows_skip_reports_the_reasons(tmp_path, capsys):
    ckpt = tok_only_ckpt(tmp_path)
    p = tmp_path / "d.jsonl"
    write_with_broken_rows(p, dialogs(100), [2, 30, 50])
    argv = ["--ckpt", str(ckpt), "--data", str(p), "--out", str(tmp_path / "out"), "--seq-len", "128",
            "--prepare-data", "--data-workers", "1"]
    assert train.main(argv) == 2
    assert capsys.readouterr().err.startswith(f"error: {p}:2: not valid JSON")  # the default: error
    assert not (tmp_path / "out").exists()
    assert train.main(argv + ["--bad-rows", "skip", "--max-bad-fraction", "0.05"]) == 0
    out = capsys.readouterr().out
    for line in ("    skipped 1: invalid_json", "    skipped 1: unknown_format", "    skipped 1: invalid_dialog"):
        assert out.count(line + "\n") == 2  # the file's line and the total's
    stats = json.loads((tmp_path / "out" / "data_stats.json").read_text())
    assert stats["total"]["skipped"] == {"invalid_dialog": 1, "invalid_json": 1, "unknown_format": 1}
    assert stats["total"]["rows"] == 103 and stats["total"]["accepted"] == 100
    assert len((tmp_path / "out" / "data" / "skipped.jsonl").read_text().splitlines()) == 3
