"""Fuzzing the data layer: small valid files of every format (chat, Alpaca, ShareGPT, OASST messages and trees,
text rows) in every container (.jsonl, .json, .gz, .parquet), mutated the ways real files break (values replaced
by null, numbers, lists, objects, empty or long strings, lone surrogates; keys deleted; bytes flipped, files cut,
invalid UTF-8, corrupt gzip/parquet; OASST parent loops, dangling parents, duplicate ids, very deep threads).
Each case must end in a complete prepared corpus or a DataError of one line, with nothing left at the
destination: never another exception. The bulk runs in-process (llama.corpus.prepare_corpus, seeded cases with
--bad-rows error and skip); the inputs that once ended in a traceback also run through train.py --prepare-data,
for the exit code, the one `error:` line and the absent --out."""
import copy
import gzip
import io
import json
import random
import shutil
import subprocess
import sys
import traceback

from conftest import DEMO_TOKENIZER, ROOT
from llama import Tokenizer, corpus
from llama.data import DataError

try:
    import pyarrow as pa
    import pyarrow.parquet as pq
except ImportError:
    pa = pq = None

CASES = 300

SEEDS = {  # format -> valid rows
    "chat": [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hot?"},
                           {"role": "assistant", "content": "Cold."}]},
             {"messages": [{"role": "user", "content": [{"type": "text", "text": "Up"}, {"type": "text", "text": "?"}]},
                           {"role": "assistant", "content": "Down."}], "id": "x2"}],
    "alpaca": [{"instruction": "Give the opposite.", "input": "hot", "output": "cold"},
               {"instruction": "Name a colour.", "input": "", "output": "Blue."}],
    "sharegpt": [{"id": "s1", "conversations": [{"from": "human", "value": "Hot?"}, {"from": "gpt", "value": "Cold."},
                                                {"from": "human", "value": "Up?"}, {"from": "gpt", "value": "Down."}]}],
    "text": [{"text": "<s>[INST] Hot? [/INST] Cold. </s>"}, {"text": "### Human: Up?### Assistant: Down."},
             {"text": "<|user|>\nWet?\n<|assistant|>\nDry.</s>"}],
}


def oasst_messages(depth: int = 3, trees: int = 2) -> list[dict]:
    """OASST message rows: each tree a prompt with two ranked replies, the first one a thread `depth` long."""
    rows = []
    for t in range(trees):
        common = {"message_tree_id": f"t{t}", "lang": "en", "review_result": True, "tree_state": "ready_for_export"}
        rows.append({"message_id": f"t{t}m0", "role": "prompter", "text": f"Question {t}?", **common})
        rows.append({"message_id": f"t{t}x", "parent_id": f"t{t}m0", "role": "assistant", "text": "Other.", "rank": 1,
                     **common})
        for d in range(1, depth):
            rows.append({"message_id": f"t{t}m{d}", "parent_id": f"t{t}m{d - 1}",
                         "role": ("prompter", "assistant")[d % 2], "text": f"Turn {d}.", "rank": 0, **common})
    return rows


def oasst_trees(rows: list[dict]) -> list[dict]:
    """The same messages as tree rows (replies nested), built without recursion (threads may be deep)."""
    nodes = {r["message_id"]: {k: v for k, v in r.items() if k not in ("message_tree_id", "tree_state")} for r in rows}
    out = []
    for r in rows:
        if "parent_id" in r:
            nodes[r["parent_id"]].setdefault("replies", []).append(nodes[r["message_id"]])
        else:
            out.append({"message_tree_id": r["message_tree_id"], "tree_state": r["tree_state"],
                        "prompt": nodes[r["message_id"]]})
    return out


def json_dumps_deep(value) -> str:
    """json.dumps, also for values nested deeper than its recursion allows (deep OASST trees)."""
    try:
        return json.dumps(value)
    except RecursionError:
        pass
    parts, todo = [], [value]
    while todo:
        v = todo.pop()
        if isinstance(v, str) and v.startswith("\0raw"):
            parts.append(v[4:])
        elif isinstance(v, dict):
            items = list(v.items())
            todo.append("\0raw}")
            for k, (key, x) in reversed(list(enumerate(items))):
                todo.append(x)
                todo.append("\0raw" + ("," if k else "") + json.dumps(key) + ":")
            todo.append("\0raw{")
        elif isinstance(v, list):
            todo.append("\0raw]")
            for k, x in reversed(list(enumerate(v))):
                todo.append(x)
                if k:
                    todo.append("\0raw,")
            todo.append("\0raw[")
        else:
            parts.append(json.dumps(v))
    return "".join(parts)


VALUES = [None, 0, -1, 1.5, True, float("nan"), 10 ** 30, [], [1, "a"], {}, {"type": "image_url"}, "", " ", "\ud800",
          "a\x00b", "x" * 5000, [{"type": "text", "text": "part"}], [{"type": "image_url", "image_url": {"url": "x"}}],
          "prompter", "assistant", "user", "gpt", "t0m0", "t1m0"]


def places(value, limit: int = 300) -> list[tuple]:
    """(container, key) pairs in a JSON value, outermost first (at most `limit`), for a mutation to pick from."""
    out = []
    todo = [value]
    while todo and len(out) < limit:
        v = todo.pop(0)
        items = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ()
        for k, x in items:
            out.append((v, k))
            todo.append(x)
    return out


def mutate_values(rows: list[dict], rng: random.Random) -> tuple[list, str]:
    """Values replaced, keys deleted, in place."""
    what = []
    for _ in range(rng.choice([1, 1, 2, 3])):
        spots = places(rows)
        if not spots:
            break
        parent, key = rng.choice(spots)
        r = rng.random()
        if r < 0.2 and isinstance(parent, dict):
            del parent[key]
            what.append(f"del {key!r}")
        elif r < 0.25:
            parent[key] = "y" * 200_000
            what.append(f"{key!r}=200k chars")
        else:
            v = rng.choice(VALUES)
            parent[key] = copy.deepcopy(v)
            what.append(f"{key!r}={v!r:.30}")
    return rows, ", ".join(what)


def mutate_oasst_links(rows: list[dict], rng: random.Random) -> tuple[list, str]:
    """Parent links broken, in place."""
    i = rng.randrange(len(rows))
    kind = rng.choice(["self parent", "loop", "dangling", "duplicate", "no root", "other tree", "second root"])
    if kind == "self parent":
        rows[i]["parent_id"] = rows[i]["message_id"]
    elif kind == "loop":  # the first root replies to a message further down (a loop when that is in its tree)
        rows[0]["parent_id"] = rows[-1 - len(rows) // 2]["message_id"]
    elif kind == "dangling":
        rows[i]["parent_id"] = "nowhere"
    elif kind == "duplicate":
        rows.insert(rng.randrange(len(rows) + 1), copy.deepcopy(rows[i]))
    elif kind == "no root":
        rows = [r for r in rows if "parent_id" in r or r["message_tree_id"] != rows[i]["message_tree_id"]]
    elif kind == "other tree":
        rows[i]["message_tree_id"] = "t9"
    else:
        rows[i].pop("parent_id", None)
    return rows, kind


def mutate_bytes(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    kind = rng.choice(["flip", "cut", "invalid utf-8", "deep nesting"])
    if not data:
        return data, "empty"
    k = rng.randrange(len(data))
    if kind == "flip":
        b = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b), kind
    if kind == "cut":
        return data[:k], f"cut at {k}"
    if kind == "invalid utf-8":
        return data[:k] + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80"]) + data[k:], kind
    return data[:k] + b"[" * 3000 + data[k:], kind


def serialize(rows: list, container: str, rng: random.Random, path, valid) -> str:
    """Write rows to `path` in the container, maybe corrupting the bytes; returns what was done to them. A parquet
    file holds valid() rows instead when pyarrow cannot store what a mutation made (mixed types)."""
    if container == "parquet":
        buf = io.BytesIO()
        try:
            pq.write_table(pa.Table.from_pylist(rows), buf)
        except Exception:  # noqa: BLE001 (pyarrow refuses mixed types in many ways; the writer is not under test)
            buf = io.BytesIO()
            pq.write_table(pa.Table.from_pylist(valid()), buf)
        data = buf.getvalue()
        if rng.random() < 0.5:
            data, how = mutate_bytes(data, rng)
            path.write_bytes(data)
            return how
        path.write_bytes(data)
        return ""
    lines = [json_dumps_deep(r) for r in rows]
    text = ("[" + ",\n".join(lines) + "]") if container.startswith("json") and not container.startswith("jsonl") \
        else "".join(line + "\n" for line in lines)
    data = text.encode("utf-8", "surrogatepass")
    how = ""
    if rng.random() < 0.3:
        data, how = mutate_bytes(data, rng)
    if container.endswith(".gz"):
        data = gzip.compress(data)
        if rng.random() < 0.3:
            data, h = mutate_bytes(data, rng)
            how += f" (gzip) {h}"
    path.write_bytes(data)
    return how


def make_case(i: int, folder) -> tuple:
    """Case i: (file, what was done, DataOptions), all from random.Random(i)."""
    rng = random.Random(i)
    fmt = rng.choice(["chat", "alpaca", "sharegpt", "text", "oasst_messages", "oasst_trees"])
    containers = ["jsonl", "json", "jsonl.gz", "json.gz"] + (["parquet"] * 2 if pq is not None else [])
    container = rng.choice(containers)
    depth = rng.choice([2, 3, 5, 40, 2, 3, 5, 40] + [600, 3000] * (container != "parquet"))
    def fresh():
        if fmt == "oasst_messages":
            return oasst_messages(depth)
        if fmt == "oasst_trees":
            return oasst_trees(oasst_messages(depth))
        seed = SEEDS[fmt][:1] if fmt == "chat" and container == "parquet" else SEEDS[fmt]  # a parquet column has
        return copy.deepcopy(seed * n)  # one type: its contents all strings or all lists of parts
    n = rng.randint(1, 3)
    rows = fresh()
    what = [fmt, container, f"depth {depth}" if fmt.startswith("oasst") else ""]
    r = rng.random()
    if fmt == "oasst_messages" and r < 0.35:
        rows, how = mutate_oasst_links(rows, rng)
        what.append(how)
    elif r < 0.8:
        rows, how = mutate_values(rows, rng)
        what.append(how)
    path = folder / f"data.{container}"
    what.append(serialize(rows, container, rng, path, fresh))
    opts = corpus.DataOptions(template=rng.choice(["llama2", "tulu", "oasst", "alpaca"]), seq_len=64,
                              text_as_lm=rng.random() < 0.3, bad_rows=rng.choice(["error", "skip"]),
                              max_bad_fraction=rng.choice([0.01, 0.5, 1.0]), overlong=rng.choice(["truncate", "drop"]))
    return path, "; ".join(w for w in what if w), opts


def test_fuzzed_files_prepare_or_refuse(tmp_path):
    tok = Tokenizer(str(DEMO_TOKENIZER))
    counts = {"prepared": 0, "refused": 0, "crashed": 0}
    problems = []
    for i in range(CASES):
        case = tmp_path / f"case{i}"
        case.mkdir()
        path, what, opts = make_case(i, case)
        out = case / "out"
        dest = out / "data"
        try:
            try:
                meta = corpus.prepare_corpus([str(path)], tok, dest, opts, workers=2 if i % 50 == 0 else 1)
            except DataError as e:
                counts["refused"] += 1
                msg = str(e)
                assert msg and "\n" not in msg and len(msg) < 2000, f"not one short line: {msg[:3000]!r}"
                assert not out.exists() or not any(out.iterdir()), f"left behind: {list(out.iterdir())}"
            except Exception:
                counts["crashed"] += 1
                raise
            else:
                counts["prepared"] += 1
                assert sorted(p.name for p in out.iterdir()) == ["data"], f"left behind: {list(out.iterdir())}"
                _, splits = corpus.open_corpus(dest)  # complete: every array there and agreeing
                assert len(splits["train"]) == meta["stats"]["total"]["accepted"] > 0
        except Exception:
            problems.append(f"case {i} ({what}; {opts}):\n{traceback.format_exc()}")
        shutil.rmtree(case)
    print(f"\nfuzz: {CASES} cases: {counts['prepared']} prepared, {counts['refused']} refused, "
          f"{counts['crashed']} crashed")
    assert not problems, f"{len(problems)} problems; the first 5:\n" + "\n".join(problems[:5])
    assert counts["prepared"] > CASES // 10 and counts["refused"] > CASES // 10  # the mutations hit both sides


def test_fuzz_findings_through_the_cli(tmp_path, capsys):
    """The inputs that once ended in a traceback, through `train.py --prepare-data`: exit 2, one `error:` line, no
    traceback, nothing at --out. In-process (train.main) for each, and one in a subprocess, as a user runs it."""
    import train
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copy(DEMO_TOKENIZER, ckpt / "tokenizer.model")
    files = {
        "sharegpt.jsonl": json.dumps({"conversations": [{"from": ["human"], "value": "x"}]}) + "\n",
        "oasst.messages.jsonl": "".join(json.dumps({**r, "parent_id": {"id": "x"}} if k == 1 else r) + "\n"
                                        for k, r in enumerate(oasst_messages())),
        "oasst.trees.jsonl": json_dumps_deep(oasst_trees(oasst_messages(3000, trees=1))[0]) + "\n",
        "chat.jsonl": json.dumps({"messages": [{"role": "user", "content": "a\ud800"},
                                               {"role": "assistant", "content": "b"}]}) + "\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)

    def argv(name):
        return ["--prepare-data", "--ckpt", str(ckpt), "--data", str(tmp_path / name), "--out",
                str(tmp_path / f"out-{name}"), "--seq-len", "64", "--data-workers", "1"]
    for name in files:
        assert train.main(argv(name)) == 2, name
        err = capsys.readouterr().err
        assert err.startswith(f"error: {tmp_path / name}:") and err.count("\n") == 1, (name, err)
        assert not (tmp_path / f"out-{name}").exists(), name
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), *argv("oasst.trees.jsonl")], capture_output=True,
                       text=True, cwd=tmp_path, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr == f"error: {tmp_path / 'oasst.trees.jsonl'}:1: cannot read the JSON: it nests deeper than " \
        "Python's JSON reader allows (about 1000 levels of objects and lists; an OpenAssistant tree row nests two " \
        "per reply)\n"
    assert not (tmp_path / "out-oasst.trees.jsonl").exists()
