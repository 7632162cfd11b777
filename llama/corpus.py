"""Dialogs -> a tokenized corpus on disk -> packed micro-batches built when they are drawn.

`prepare_corpus` reads the `--data` sources (llama.data), tokenizes every sample once in worker processes,
filters (overlong, too few trained tokens), draws the fraction and the val split by group (an OASST tree,
else a row) from the seed, and writes a folder, atomically (a temp folder renamed at the end):

    meta.json              {"key": what it was made from, "stats": per-source counts, "splits": sizes}
    skipped.jsonl          with bad_rows="skip", when rows were left out: {"where": "file:row", "reason",
                           "error"} for each of the first MAX_LISTED (every one is counted in the stats)
    train/ val/            per split (val only with a val split):
      ids.npy              int32 [tokens]       every kept sample's token ids, concatenated
      mask.npy             uint8 [tokens]       1 where the token is trained on (llama.chat.encode_chat's mask)
      offsets.npy          int64 [samples + 1]  sample i is ids[offsets[i]:offsets[i + 1]]
      targets.npy          int32 [samples]      trained next-token targets per sample (mask[1:] summed)
      pack_rows.npy        int64 [rows + 1]     the best-fit-decreasing plan at the key's seq_len: row r holds
      pack_samples.npy     int64 [samples]      samples pack_samples[pack_rows[r]:pack_rows[r + 1]], in order

Training memory-maps the arrays (`open_corpus`) and keeps only row plans; `build_batch` makes a micro-batch's
tokens/labels/doc_ids from them. The key holds a content hash of every data file, the tokenizer's sha256 and
every option that changes the arrays, so a rerun can tell whether the folder is still what it would write.
"""
from __future__ import annotations

import hashlib
import heapq
import json
import multiprocessing as mp
import os
import random
import sys
from bisect import bisect_left, insort
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from itertools import chain, islice
from pathlib import Path

import numpy as np

from .chat import encode_chat
from .data import DataError, data_files, parse_data_spec, read_dialogs
from .files import Progress, atomic_folder
from .tokenizer import Tokenizer

VERSION = 1
SKIP_REASONS = ("overlong", "too_few_assistant_tokens")  # status codes 1, 2 (0: kept)
ARRAYS = {"ids": np.int32, "mask": np.uint8, "offsets": np.int64, "targets": np.int32,
          "pack_rows": np.int64, "pack_samples": np.int64}
CHUNK_ROWS, CHUNK_CHARS = 1024, 1 << 21  # a worker's unit of work: this many dialogs or characters
MAX_LISTED = 1000  # bad rows written to skipped.jsonl


@dataclass(frozen=True)
class DataOptions:
    """Everything besides the files and the tokenizer that changes the prepared arrays."""
    template: str = "llama2"
    seq_len: int = 1024
    overlong: str = "truncate"  # truncate | drop
    min_assistant_tokens: int = 1
    val_split: float = 0.0
    max_val: int = 1000
    seed: int = 0
    oasst_top_k: int = 0
    oasst_lang: tuple[str, ...] = ()
    text_as_lm: bool = False
    bad_rows: str = "error"  # error | skip: a bad row stops the run, or is left out (llama.data.read_dialogs)
    max_bad_fraction: float = 0.01  # with skip: more bad rows than this share of a file is an error


# ---------------------------------------------------------------------------------------------------------
# The key: what a prepared folder was made from.


def file_sha256(path: Path) -> str:
    """sha256 of the file's bytes, read in blocks (never the whole file in memory)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def tokenizer_sha256(tokenizer: Tokenizer) -> str:
    """sha256 of the SentencePiece model plus the added special tokens and their ids."""
    h = hashlib.sha256(tokenizer.sp.serialized_model_proto())
    h.update(json.dumps(sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1])).encode())
    return h.hexdigest()


def corpus_key(data: list[str], tokenizer: Tokenizer, opts: DataOptions) -> dict:
    """The sources (file names, sizes and content hashes, fractions), the tokenizer's hash and the options."""
    # The whole content is hashed, not size + mtime (a copy or an edit in place keeps those) nor sampled blocks
    # (a changed row in between would go unseen): streamed sha256 runs at disk/memory speed, and the files
    # are hashed in threads (hashlib releases the GIL), so a sharded hub folder takes about its largest file.
    sources = []
    with ThreadPoolExecutor(resolve_workers(0)) as ex:
        for path, fraction in map(parse_data_spec, data):
            files = data_files(path)
            hashes = ex.map(file_sha256, files)
            sources.append({"path": str(path), "fraction": fraction, "files": [
                {"name": f.name, "bytes": f.stat().st_size, "sha256": h} for f, h in zip(files, hashes)]})
    return {"version": VERSION, "sources": sources, "tokenizer_sha256": tokenizer_sha256(tokenizer),
            **asdict(opts), "oasst_lang": list(opts.oasst_lang)}


def key_difference(a: dict, b: dict) -> list[str]:
    """The fields in which two keys differ (a source counts as the same when its files' contents are; an option
    a key lacks, written before the option existed, has its default)."""
    def content(k):
        return [(s["fraction"], [(f["bytes"], f["sha256"]) for f in s["files"]]) for s in k.get("sources", [])]
    default = asdict(DataOptions())
    diff = [k for k in sorted(set(a) | set(b))
            if k != "sources" and a.get(k, default.get(k)) != b.get(k, default.get(k))]
    return (["data files"] if content(a) != content(b) else []) + diff


def check_fits(folder: Path, key: dict, tokenizer: Tokenizer, template: str, seq_len: int) -> None:
    """The one check that a prepared corpus (`key`: its meta.json key) fits a run: written with this tokenizer
    (added tokens included) and template, no sample longer than the run's seq_len. A DataError says what to do."""
    theirs, ours = str(key.get("tokenizer_sha256")), tokenizer_sha256(tokenizer)
    if theirs != ours:
        raise DataError(f"prepared data {folder} was tokenized with another tokenizer (sha256 {theirs[:12]}..., "
                        f"this run's is {ours[:12]}...; with --template chatml the added tokens count): prepare it "
                        "again with this run's --ckpt and --template")
    if key.get("template") != template:
        raise DataError(f"prepared data {folder} was rendered with --template {key.get('template')}; "
                        f"pass --template {key.get('template')} (this run has {template})")
    if key.get("seq_len", 0) > seq_len:
        raise DataError(f"prepared data {folder} holds samples of up to {key['seq_len']} tokens "
                        f"(--seq-len {key['seq_len']}); pass --seq-len {key['seq_len']} or prepare it again")


# ---------------------------------------------------------------------------------------------------------
# Tokenization: chunks of dialogs -> numpy arrays, in worker processes.

_worker: dict = {}


def _init_worker(tok_path: str, special: dict[str, int]) -> None:
    """Each worker loads the tokenizer once, with the caller's added tokens at the caller's ids."""
    tok = Tokenizer(tok_path)
    tok.add_special_tokens([t for t, _ in sorted(special.items(), key=lambda kv: kv[1])])
    assert tok.special_tokens == special, f"worker tokenizer has added tokens {tok.special_tokens}, expected {special}"
    _worker["tok"] = tok


def _encode_chunk(chunk: list[dict], opts: DataOptions, tok: Tokenizer | None = None) -> dict[str, np.ndarray]:
    """Tokenize each dialog once; truncate or drop what is longer than seq_len; count what is trained.

    Returns the kept tokens of the chunk concatenated (ids, mask) and per dialog: kept length (0 when
    skipped), full length, status (0 kept, 1 overlong, 2 too few trained tokens), trained tokens, targets."""
    tok = tok or _worker["tok"]
    ids_all, mask_all = [], []
    kept, full, trained, targets = (np.zeros(len(chunk), np.int32) for _ in range(4))
    status = np.zeros(len(chunk), np.int8)
    for k, d in enumerate(chunk):
        if "text" in d:  # plain language modelling: bos + text + eos, every token trained
            ids = tok.encode(d["text"], bos=True, eos=True)
            mask = [True] * len(ids)
        else:
            try:
                ids, mask = encode_chat(tok, d["messages"], opts.template)
            except ValueError as e:
                raise DataError(f"{d['where']}: {e}") from None
        full[k] = len(ids)
        if len(ids) > opts.seq_len:
            if opts.overlong == "drop":
                status[k] = 1
                continue
            ids, mask = ids[: opts.seq_len], mask[: opts.seq_len]
        t = sum(mask)
        if t < max(opts.min_assistant_tokens, 1):
            status[k] = 2
            continue
        kept[k], trained[k], targets[k] = len(ids), t, t - mask[0]
        ids_all += ids
        mask_all += mask
    return {"ids": np.array(ids_all, np.int32), "mask": np.array(mask_all, np.uint8), "kept": kept, "full": full,
            "status": status, "trained": trained, "targets": targets}


def _chunks(dialogs, group_of: list[int]):
    """Dialogs -> lists of at most CHUNK_ROWS dialogs or about CHUNK_CHARS characters; appends each dialog's
    group, numbered by first appearance, to group_of (the group bookkeeping stays in the main process)."""
    chunk, chars, numbers = [], 0, {}
    for d in dialogs:
        group_of.append(numbers.setdefault(d["group"], len(numbers)))
        chunk.append(d)
        chars += len(d["text"]) if "text" in d else sum(len(m.get("content") or "") for m in d["messages"])
        if len(chunk) >= CHUNK_ROWS or chars >= CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def resolve_workers(workers: int) -> int:
    """`workers`, or when 0 the cores this process may run on."""
    if workers > 0:
        return workers
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _tokenized(chunks, tokenizer: Tokenizer, opts: DataOptions, workers: int):
    """Encoded chunks in input order. With several workers, at most 2 per worker are in flight (memory
    stays bounded whatever the corpus size); a single chunk is encoded here without starting any."""
    head = list(islice(chunks, 2))
    if workers <= 1 or len(head) < 2:
        yield from (_encode_chunk(c, opts, tokenizer) for c in chain(head, chunks))
        return
    # fork where the platform has it (no re-import of the caller's modules); the functions are spawn-safe too
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    initargs = (str(tokenizer.path), dict(tokenizer.special_tokens))
    with ctx.Pool(workers, initializer=_init_worker, initargs=initargs) as pool:
        pending = deque(pool.apply_async(_encode_chunk, (c, opts)) for c in head)
        while pending:
            try:
                while len(pending) < 2 * workers and (c := next(chunks, None)) is not None:
                    pending.append(pool.apply_async(_encode_chunk, (c, opts)))
            except DataError:  # a bad row read later: the earlier rows' errors come first, as with one worker
                while pending:
                    pending.popleft().get()
                raise
            yield pending.popleft().get()


# ---------------------------------------------------------------------------------------------------------
# prepare_corpus: sources -> tokenized temp arrays -> split and order -> the folder.


def _write_npy(path: Path, dtype, n: int):
    """An open .npy file whose header says [n] of dtype; the caller appends the data."""
    f = open(path, "wb")
    np.lib.format.write_array_header_1_0(f, {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": (n,)})
    return f


def _show_progress(progress: Progress, rows: int, tokens: int, done: bool = False) -> None:
    dt = max(progress.elapsed(), 1e-9)
    rates = f"{rows / dt:,.0f} rows/s, {tokens / dt / 1e6:.2f}M tokens/s"
    progress(f"{rows:,} rows, {tokens:,} tokens, {rates}, {dt:.0f}s", done)


def _starts(lengths) -> np.ndarray:
    """[0, l0, l0 + l1, ...]: where each of the pieces of these lengths starts in their concatenation, then the end."""
    return np.concatenate(([0], np.cumsum(lengths, dtype=np.int64)))


def _stats(cat: dict, picked: np.ndarray, train: np.ndarray, val: np.ndarray, bad: Counter) -> dict:
    """meta.json's counts for the drawn samples `picked`, of which `train` and `val` were kept, and the bad rows
    left out (read_dialogs' reasons -> counts)."""
    skipped = np.bincount(cat["status"][picked], minlength=len(SKIP_REASONS) + 1)
    both = np.concatenate([train, val])
    kept = cat["kept"][both]
    return {"rows": len(picked) + sum(bad.values()), "accepted": len(train), "val": len(val),
            "skipped": {**dict(sorted(bad.items())),
                        **{why: int(skipped[code]) for code, why in enumerate(SKIP_REASONS, 1) if skipped[code]}},
            "truncated": int((cat["full"][both] > kept).sum()), "tokens": int(kept.sum()),
            "trained_tokens": int(cat["trained"][both].sum()),
            "min_tokens": int(kept.min()) if len(both) else None, "max_tokens": int(kept.max(initial=0)),
            "mean_tokens": round(int(kept.sum()) / len(both), 1) if len(both) else 0}


def prepare_corpus(data: list[str], tokenizer: Tokenizer, dest: Path, opts: DataOptions, *, workers: int = 0,
                   key: dict | None = None) -> dict:
    """Tokenize, filter and split the sources into the folder `dest` (replaced atomically); returns meta.json's
    content. A DataError leaves `dest` as it was. The steps: 1) _tokenize_sources, 2) _draw, 3) _write_splits,
    4) skipped.jsonl and meta.json."""
    if not data:
        raise DataError("no data sources given (expected one or more files or folders)")
    key = key or corpus_key(data, tokenizer, opts)
    with atomic_folder(dest) as tmp:
        cat, groups, bad, listed = _tokenize_sources(data, tokenizer, tmp, opts, resolve_workers(workers))
        stats, train, val = _draw(data, cat, groups, bad, opts)
        if not len(train):
            raise DataError(f"no training samples left after filtering ({json.dumps(stats['files'])})")
        splits = _write_splits(tmp, cat, {"train": train, "val": val}, opts.seq_len)
        if listed:
            (tmp / "skipped.jsonl").write_text("".join(json.dumps(r) + "\n" for r in listed))
        meta = {"format": "llama2-sft tokenized corpus", "key": key, "stats": stats, "splits": splits}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


def _left_out(samples, bad: Counter, listed: list[dict]):
    """The samples without read_dialogs' records of bad rows, which are counted by reason in `bad` and the first
    MAX_LISTED of which are appended to `listed` (here, in the main process: workers see only good rows, so
    the corpus does not depend on their count and a bad row takes no group in the draw)."""
    for s in samples:
        if "skipped" not in s:
            yield s
            continue
        bad[s["skipped"]] += 1
        if len(listed) < MAX_LISTED:
            listed.append({"where": s["where"], "reason": s["skipped"], "error": s["error"]})


def _tokenize_sources(data, tokenizer, tmp: Path, opts: DataOptions, workers: int):
    """1) Every sample of every source, tokenized in file order, its kept tokens appended to the temp files
    all_ids.bin and all_mask.bin. Returns (the per-sample arrays of _encode_chunk over all sources, per source:
    each sample's group, the bad rows left out by reason; the bad rows listed for skipped.jsonl)."""
    per: dict[str, list] = {k: [] for k in ("kept", "full", "status", "trained", "targets")}
    groups: list[list[int]] = []  # per source: each sample's group, numbered by first appearance
    bad: list[Counter] = []  # per source: bad rows left out, by reason
    listed: list[dict] = []
    show = Progress("tokenizing", tty_every=1, log_every=10, quiet=2)
    rows = tokens = 0
    with open(tmp / "all_ids.bin", "wb") as fi, open(tmp / "all_mask.bin", "wb") as fm:
        for spec in data:
            dialogs = read_dialogs(parse_data_spec(spec)[0], oasst_top_k=opts.oasst_top_k,
                                   oasst_lang=list(opts.oasst_lang) or None, text_as_lm=opts.text_as_lm,
                                   template=opts.template, bad_rows=opts.bad_rows,
                                   max_bad_fraction=opts.max_bad_fraction)
            groups.append([])
            bad.append(Counter())
            for r in _tokenized(_chunks(_left_out(dialogs, bad[-1], listed), groups[-1]), tokenizer, opts, workers):
                fi.write(r["ids"].tobytes())
                fm.write(r["mask"].tobytes())
                for k in per:
                    per[k].append(r[k])
                rows, tokens = rows + len(r["kept"]), tokens + len(r["ids"])
                _show_progress(show, rows, tokens)
    _show_progress(show, rows, tokens, done=True)
    cat = {k: (np.concatenate(v) if v else np.zeros(0, np.int64)) for k, v in per.items()}
    return cat, groups, bad, listed


def _draw(data, cat: dict, groups: list[list[int]], bad: list[Counter], opts: DataOptions):
    """2) Per source: shuffle its groups (one Random(seed) across sources, in order), keep the fraction, hold out
    the first groups until the val share is reached; samples keep their file order within a group. Returns
    (meta.json's stats, the train samples, the val samples: indices into `cat`)."""
    rng = random.Random(opts.seed)
    drawn = []  # per source: (path, picked, train, val, bad rows), picked, train and val indices into cat
    first = 0
    for spec, group, b in zip(data, groups, bad):
        path, fraction = parse_data_spec(spec)
        n_groups = max(group, default=-1) + 1
        perm = list(range(n_groups))
        rng.shuffle(perm)
        chosen = np.array(perm[: max(1, round(n_groups * fraction))], np.int64)
        place = np.full(n_groups, n_groups)  # a group's place in the draw; n_groups: not drawn
        place[chosen] = np.arange(len(chosen))
        sizes = np.bincount(group, minlength=n_groups)[chosen]
        # the chosen groups' samples, group after group
        picked = first + np.argsort(place[group], kind="stable")[: sizes.sum()]
        first += len(group)
        n_val = min(opts.max_val, int(len(picked) * opts.val_split))
        in_val = np.repeat(np.cumsum(sizes) - sizes < n_val, sizes)  # whole groups until n_val samples held out
        ok = cat["status"][picked] == 0
        drawn.append((str(path), picked, picked[ok & ~in_val], picked[ok & in_val], b))
    stats = {"files": {path: _stats(cat, *d) for path, *d in drawn}}
    picked, train, val = (np.concatenate([d[i] for d in drawn]) for i in (1, 2, 3))
    stats["total"] = _stats(cat, picked, train, val, sum(bad, Counter()))
    return stats, train, val


def _write_splits(tmp: Path, cat: dict, chosen: dict[str, np.ndarray], seq_len: int) -> dict:
    """3) Each non-empty split's arrays (`chosen`: its samples, in order), gathered from the temp files a block
    at a time, which then go. Returns meta.json's "splits"."""
    start = _starts(cat["kept"])  # where each sample's kept tokens are in the temp files
    splits = {}
    with open(tmp / "all_ids.bin", "rb") as fi, open(tmp / "all_mask.bin", "rb") as fm:
        for name, sel in chosen.items():
            if not len(sel):
                continue
            offsets = _starts(cat["kept"][sel])
            n_tokens = int(offsets[-1])
            d = tmp / name
            d.mkdir()
            with _write_npy(d / "ids.npy", np.int32, n_tokens) as oi, \
                    _write_npy(d / "mask.npy", np.uint8, n_tokens) as om:
                for a in range(0, len(sel), 1024):
                    block = sel[a: a + 1024]
                    oi.write(b"".join(os.pread(fi.fileno(), 4 * int(cat["kept"][i]), 4 * int(start[i])) for i in block))
                    om.write(b"".join(os.pread(fm.fileno(), int(cat["kept"][i]), int(start[i])) for i in block))
            pack_rows, pack_samples = pack_plan(cat["kept"][sel], seq_len)
            np.save(d / "offsets.npy", offsets)
            np.save(d / "targets.npy", cat["targets"][sel].astype(np.int32))
            np.save(d / "pack_rows.npy", pack_rows)
            np.save(d / "pack_samples.npy", pack_samples)
            splits[name] = {"samples": len(sel), "tokens": n_tokens, "packed_rows": len(pack_rows) - 1,
                            "packing_efficiency": round(n_tokens / ((len(pack_rows) - 1) * seq_len), 4)}
    (tmp / "all_ids.bin").unlink()
    (tmp / "all_mask.bin").unlink()
    return splits


# ---------------------------------------------------------------------------------------------------------
# Packing: best-fit decreasing over sample lengths -> row plans (numpy), never token copies.


def pack_plan(lengths: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit-decreasing bin packing of samples into rows of seq_len tokens.

    Samples are taken longest first (ties in sample order); each goes into the row with the least room that
    still fits it (ties: the oldest row), else opens a row. Returns (row_starts [R + 1], samples [n]): row r
    holds samples[row_starts[r]:row_starts[r + 1]] in the order they were placed."""
    lengths = np.asarray(lengths, np.int64)
    if len(lengths) and int(lengths.max()) > seq_len:
        raise ValueError(f"a sample of {int(lengths.max())} tokens does not fit in a row of {seq_len}")
    order = np.argsort(-lengths, kind="stable")
    rooms: list[int] = []  # the distinct room values that some row has left, sorted
    rows_with: dict[int, list[int]] = {}  # room -> heap of the rows with that room
    row_of: list[int] = []
    n_rows = 0
    for n in lengths[order].tolist():
        j = bisect_left(rooms, n)
        if j == len(rooms):
            r, room = n_rows, seq_len - n
            n_rows += 1
        else:
            old = rooms[j]
            heap = rows_with[old]
            r, room = heapq.heappop(heap), old - n
            if not heap:
                del rows_with[old], rooms[j]
        row_of.append(r)
        if room > 0:
            if room not in rows_with:
                insort(rooms, room)
            heapq.heappush(rows_with.setdefault(room, []), r)
    row_of_a = np.array(row_of, np.int64)
    return _starts(np.bincount(row_of_a, minlength=n_rows)), order[np.argsort(row_of_a, kind="stable")].astype(np.int64)


# ---------------------------------------------------------------------------------------------------------
# Reading a prepared folder; micro-batches.


@dataclass
class Split:
    """One split of a corpus: memory-mapped arrays."""
    ids: np.ndarray
    mask: np.ndarray
    offsets: np.ndarray
    targets: np.ndarray
    pack_rows: np.ndarray | None = None  # the cached best-fit-decreasing plan, at `pack_seq_len`
    pack_samples: np.ndarray | None = None
    pack_seq_len: int = 0

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.ids[a:b], self.mask[a:b]


@dataclass
class Rows:
    """A row plan: row r holds samples[starts[r]:starts[r + 1]]; targets[r] = its trained labels."""
    starts: np.ndarray
    samples: np.ndarray
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.starts) - 1


def make_rows(split: Split, seq_len: int, packing: bool = True) -> Rows:
    """The split's row plan: best-fit-decreasing packing (the folder's cached plan when it was made for this
    seq_len), or one sample per row."""
    n = len(split)
    if not packing:
        starts, samples = np.arange(n + 1, dtype=np.int64), np.arange(n, dtype=np.int64)
    elif split.pack_rows is not None and split.pack_seq_len == seq_len:
        starts, samples = np.asarray(split.pack_rows), np.asarray(split.pack_samples)
    else:
        starts, samples = pack_plan(split.lengths, seq_len)
    per_sample = np.asarray(split.targets, np.int64)[samples]
    targets = np.add.reduceat(per_sample, starts[:-1]) if n else np.zeros(0, np.int64)
    return Rows(starts, samples, targets)


def build_batch(split: Split, rows: Rows, which, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """tokens/labels/doc_ids [len(which), seq_len] (int64) for the rows `which`. labels[i] is the next token
    where that token is trained, else -100; each sample is its own document, the padded tail one more."""
    which = np.asarray(which, np.int64).reshape(-1)
    tokens = np.full((len(which), seq_len), pad_id, np.int64)
    labels = np.full((len(which), seq_len), -100, np.int64)
    doc_ids = np.empty((len(which), seq_len), np.int64)
    for b, r in enumerate(which.tolist()):
        t = 0
        members = rows.samples[rows.starts[r]: rows.starts[r + 1]]
        for d, s in enumerate(members.tolist()):
            a, e = int(split.offsets[s]), int(split.offsets[s + 1])
            n = e - a
            tokens[b, t: t + n] = split.ids[a:e]
            labels[b, t: t + n - 1] = np.where(split.mask[a + 1: e] != 0, split.ids[a + 1: e], -100)
            doc_ids[b, t: t + n] = d
            t += n
        doc_ids[b, t:] = len(members)  # the padding is its own document
    return {"tokens": tokens, "labels": labels, "doc_ids": doc_ids}


def is_prepared(path: Path) -> bool:
    """Whether `path` is a folder written by prepare_corpus (meta.json + train/ids.npy)."""
    path = Path(path)
    return path.is_dir() and (path / "meta.json").is_file() and (path / "train" / "ids.npy").is_file()


def read_meta(folder: Path) -> dict:
    try:
        meta = json.loads((Path(folder) / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"prepared data {folder}: cannot read meta.json ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("key"), dict) or not isinstance(meta.get("splits"), dict):
        raise DataError(f"prepared data {folder}: meta.json lacks the key and splits prepare_corpus writes")
    return meta


def open_corpus(folder: Path) -> tuple[dict, dict[str, Split]]:
    """(meta, {"train": Split, "val": Split (when there is one)}) of a prepared folder, memory-mapped and
    checked: every array there with the right dtype and a length that agrees with the others. Any disagreement
    is a DataError naming the folder. (Whether it fits a run: `check_fits`.)"""
    folder = Path(folder)
    meta = read_meta(folder)
    splits = {}
    for name in [s for s in ("train", "val") if s in meta["splits"]]:
        arrays = {}
        for k, dtype in ARRAYS.items():
            try:
                a = np.load(folder / name / f"{k}.npy", mmap_mode="r")
            except (OSError, ValueError) as e:
                raise DataError(f"prepared data {folder}: cannot read {name}/{k}.npy ({e})") from None
            if a.dtype != np.dtype(dtype) or a.ndim != 1:
                raise DataError(f"prepared data {folder}: {name}/{k}.npy is {a.dtype} {a.shape}, "
                                f"expected 1-d {np.dtype(dtype)}")
            arrays[k] = a
        offsets = arrays["offsets"] = np.asarray(arrays["offsets"])
        n = len(offsets) - 1
        problems = []
        if n < 0 or offsets[0] != 0 or (n and (np.diff(offsets) <= 0).any()):
            problems.append("offsets.npy does not start at 0 and increase")
        elif offsets[-1] != len(arrays["ids"]) or len(arrays["mask"]) != len(arrays["ids"]):
            problems.append(f"ids.npy has {len(arrays['ids'])} tokens, mask.npy {len(arrays['mask'])}, "
                            f"offsets.npy ends at {offsets[-1]}")
        if len(arrays["targets"]) != n or len(arrays["pack_samples"]) != n:
            problems.append(f"offsets.npy holds {n} samples, targets.npy {len(arrays['targets'])}, "
                            f"pack_samples.npy {len(arrays['pack_samples'])}")
        rows = arrays["pack_rows"] = np.asarray(arrays["pack_rows"])
        if not problems and (len(rows) < 1 or rows[0] != 0 or rows[-1] != n or (np.diff(rows) <= 0).any()
                             or (n and np.bincount(arrays["pack_samples"], minlength=n).max(initial=0) != 1)):
            problems.append("pack_rows.npy/pack_samples.npy are not a plan over every sample once")
        if not problems and meta["splits"][name].get("samples") != n:
            problems.append(f"meta.json says {meta['splits'][name].get('samples')} samples, offsets.npy holds {n}")
        if problems:
            raise DataError(f"prepared data {folder}: the {name} arrays disagree: {'; '.join(problems)}; "
                            "prepare it again (--prepare-data)")
        splits[name] = Split(**arrays, pack_seq_len=int(meta["key"].get("seq_len", 0)))
    if "train" not in splits:
        raise DataError(f"prepared data {folder}: meta.json lists no train split")
    return meta, splits


# ---------------------------------------------------------------------------------------------------------
# Showing what trains.


def render_sample(tokenizer: Tokenizer, ids, mask, color: bool = False) -> str:
    """The sample's text with every trained span marked ([[...]], or green on a terminal) and the special
    tokens (bos, eos, added tokens) written out as their pieces."""
    sp = tokenizer.sp
    added = {i: t for t, i in tokenizer.special_tokens.items()}
    out, trained_now, pending = [], False, bytearray()  # pending: a run of byte pieces (<0xE2>...), decoded whole
    open_, close = ("\x1b[32m", "\x1b[0m") if color else ("[[", "]]")
    for i, m in zip(np.asarray(ids).tolist(), np.asarray(mask).tolist()):
        byte = i not in added and sp.is_byte(i)
        if pending and (not byte or bool(m) != trained_now):
            out.append(pending.decode("utf-8", errors="replace"))
            pending.clear()
        if bool(m) != trained_now:
            out.append(open_ if m else close)
            trained_now = bool(m)
        if byte:
            pending.append(int(sp.id_to_piece(i)[3:5], 16))
        elif i in added:
            out.append(added[i])
        elif sp.is_control(i) or sp.is_unknown(i):
            out.append(sp.id_to_piece(i))
        else:
            out.append(sp.id_to_piece(i).replace("\u2581", " "))
    out.append(pending.decode("utf-8", errors="replace"))
    if trained_now:
        out.append(close)
    return "".join(out)


def show_samples(split: Split, tokenizer: Tokenizer, n: int, color: bool = False) -> str:
    """The first n samples of a split, rendered by render_sample, each under a header line."""
    parts = []
    for i in range(min(n, len(split))):
        ids, mask = split.sample(i)
        parts.append(f"--- sample {i}: {len(ids)} tokens, {int(np.asarray(mask).sum())} trained, marked "
                     f"{'in green' if color else 'by double brackets'}\n{render_sample(tokenizer, ids, mask, color)}")
    return "\n".join(parts)
