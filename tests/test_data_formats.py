"""llama/data.py: every container and format, from small files in the published schemas, against dialogs
written out by hand; and the bad inputs, each a DataError naming the file and row."""
import gzip
import json
import re

import pytest

from llama import data
from llama.data import DataError, data_files, iter_rows, parse_data_spec, read_dialogs

try:
    import pyarrow as pa
    import pyarrow.parquet as pq
except ImportError:
    pa = pq = None
needs_pyarrow = pytest.mark.skipif(pq is None, reason="pyarrow (the [data] extra) is not installed")


def write_jsonl(path, rows, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def dialogs(path, **kw):
    return [d["messages"] for d in read_dialogs(path, **kw)]


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


def S(text):
    return {"role": "system", "content": text}


# ---- chat, ShareGPT, Alpaca in every container

TULU_ROWS = [  # allenai/tulu-v2-sft-mixture rows: "dataset" and "id" ride along
    {"dataset": "oasst1", "id": "oasst1_0", "messages": [U("What is 2+2?"), A("4.")]},
    {"dataset": "sharegpt", "id": "sharegpt_7_0",
     "messages": [S("Be brief."), U("Hot?"), A("Cold."), U("Up?"), A("Down.")]},
    {"dataset": "flan_v2", "id": "flan_v2_3", "messages": [U("Say é and 漢"), A("é 漢")]},
]
TULU_DIALOGS = [[U("What is 2+2?"), A("4.")], [S("Be brief."), U("Hot?"), A("Cold."), U("Up?"), A("Down.")],
                [U("Say é and 漢"), A("é 漢")]]


def test_chat_sharegpt_alpaca_rows(tmp_path):
    assert dialogs(write_jsonl(tmp_path / "tulu.jsonl", TULU_ROWS)) == TULU_DIALOGS
    share = [{"id": "x1", "conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hot?"},
                                            {"from": "gpt", "value": "Cold."}]}]
    assert dialogs(write_jsonl(tmp_path / "share.jsonl", share)) == [[S("Be brief."), U("Hot?"), A("Cold.")]]
    alpaca = [{"instruction": "Give the opposite.", "input": "hot", "output": "cold"},
              {"instruction": "Name a colour.", "input": "", "output": "Blue."}]
    assert dialogs(write_jsonl(tmp_path / "alpaca.jsonl", alpaca)) == [
        [{"role": "user", "content": "Give the opposite.", "input": "hot"}, A("cold")],
        [U("Name a colour."), A("Blue.")]]


def test_rows_are_numbered_by_line_and_group_by_row(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(TULU_ROWS[0]) + "\n\n" + json.dumps(TULU_ROWS[2]) + "\n")
    got = list(read_dialogs(p))
    assert [(d["where"], d["group"]) for d in got] == [(f"{p}:1", f"{p}:1"), (f"{p}:3", f"{p}:3")]


@pytest.mark.parametrize("name", ["d.jsonl", "d.json", "d.jsonl.gz", "d.json.gz", "d.parquet", "arr.json",
                                  "arr.json.gz"])
def test_every_container_gives_the_same_dialogs(tmp_path, name):
    p = tmp_path / name
    if name.endswith(".parquet"):
        if pq is None:
            pytest.skip("pyarrow (the [data] extra) is not installed")
        pq.write_table(pa.Table.from_pylist(TULU_ROWS), p, row_group_size=2)
    elif name.startswith("arr"):  # a JSON array, pretty-printed over many lines
        with (gzip.open if name.endswith(".gz") else open)(p, "wt", encoding="utf-8") as f:
            json.dump(TULU_ROWS, f, indent=2, ensure_ascii=False)
    else:
        write_jsonl(p, TULU_ROWS, gzip.open if name.endswith(".gz") else open)
    assert [n for n, _ in iter_rows(p)] == [1, 2, 3]
    assert dialogs(p) == TULU_DIALOGS


def test_json_array_elements_cut_anywhere_by_the_read_chunks(tmp_path, monkeypatch):
    rows = [{"n": 12345, "messages": [U("a" * k), A("b\u00e9\\\"]},[" * k)]} for k in range(1, 9)]
    p = tmp_path / "d.json"
    p.write_text(json.dumps(rows, ensure_ascii=False) + "\n")
    for chunk in (1, 3, 7, 64):
        monkeypatch.setattr(data, "JSON_CHUNK", chunk)
        assert [r for _, r in iter_rows(p)] == rows
    p.write_text(" [ ] ")
    assert list(iter_rows(p)) == []


def test_rows_are_streamed(tmp_path):
    """The rows before a broken one come out before the error: the file is not parsed whole first."""
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(TULU_ROWS[0]) + "\n" + json.dumps(TULU_ROWS[1]) + "\n{oops\n")
    rows = iter_rows(p)
    assert next(rows)[0] == 1 and next(rows)[0] == 2
    with pytest.raises(DataError, match=re.escape(f"{p}:3: not valid JSON")):
        next(rows)
    q = tmp_path / "d.json"
    q.write_text(json.dumps(TULU_ROWS[:2])[:-1] + ', {"messages": oops}]')
    rows = iter_rows(q)
    assert next(rows)[0] == 1 and next(rows)[0] == 2
    with pytest.raises(DataError, match=re.escape(f"{q}:3: not valid JSON")):
        next(rows)


def test_json_error_at_the_end_of_a_line_names_its_column(tmp_path):
    p = tmp_path / "d.jsonl"
    line = '{"messages": [{"role": "user", "content": "hi"}]'  # 48 characters; the closing brace is missing, so
    assert len(line) == 48  # the parser stops just past the last one: column 49 (column 1 of an empty next line before)
    for end in ("\n", "\r\n"):
        p.write_text(json.dumps(TULU_ROWS[0]) + end + line + end, newline="")
        with pytest.raises(DataError, match=re.escape(f"{p}:2: not valid JSON (Expecting ',' delimiter at column 49)")):
            list(iter_rows(p))


@pytest.mark.parametrize("name, kind", [("d.csv", "CSV"), ("D.TSV", "TSV"), ("d.txt", "a .txt file"),
                                        ("d", "a file without a suffix")])
def test_a_csv_file_is_named_as_such(tmp_path, name, kind):
    p = tmp_path / name
    p.write_text("question,answer\nWhat is the opposite of hot?,It is cold.\n")
    with pytest.raises(DataError) as e:
        list(read_dialogs(p))
    assert str(e.value) == (f"{p}: {kind} is not supported (line 1 is not JSON); data files are .jsonl, .json, "
                            ".jsonl.gz, .json.gz, .parquet or a folder of them")
    # JSON lines under another suffix still read, and a bad line after good ones is a JSON error of that line.
    p.write_text(json.dumps(TULU_ROWS[0]) + "\n" + "a,b\n")
    rows = iter_rows(p)
    assert next(rows) == (1, TULU_ROWS[0])
    with pytest.raises(DataError, match=re.escape(f"{p}:2: not valid JSON (Expecting value at column 1)")):
        next(rows)


def test_byte_order_mark(tmp_path):
    """Some editors start UTF-8 files with a byte order mark."""
    p = tmp_path / "d.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps(TULU_ROWS[0]).encode() + b"\n")
    q = tmp_path / "d.json"
    q.write_bytes(b"\xef\xbb\xbf" + json.dumps(TULU_ROWS[:1]).encode())
    assert dialogs(p) == dialogs(q) == TULU_DIALOGS[:1]


def test_data_files_of_a_folder(tmp_path):
    d = tmp_path / "snap"
    (d / "data").mkdir(parents=True)
    for name in ["b.jsonl", "a.json.gz", "c.parquet", "README.md", ".hidden.jsonl", "x.json.lock"]:
        (d / name).write_text("")
    (d / "data" / "sub.jsonl").write_text("")
    assert [p.name for p in data_files(d)] == ["a.json.gz", "b.jsonl", "c.parquet"]
    assert data_files(d / "b.jsonl") == [d / "b.jsonl"]


def test_parse_data_spec():
    assert parse_data_spec("data/tulu.jsonl") == (data.Path("data/tulu.jsonl"), 1.0)
    assert parse_data_spec("oasst/data:0.25") == (data.Path("oasst/data"), 0.25)
    with pytest.raises(DataError, match=re.escape("--data a.jsonl:1.5: fraction must be in (0, 1]")):
        parse_data_spec("a.jsonl:1.5")


# ---- text rows


LLAMA2_TEXT = ("<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nWhat is 2+2? [/INST] 4. </s>"
               "<s>[INST] And 3+3? [/INST] 6. </s>")


@pytest.mark.parametrize("text, want", [
    (LLAMA2_TEXT, [S("You are terse."), U("What is 2+2?"), A("4."), U("And 3+3?"), A("6.")]),
    # mlabonne/guanaco-llama2-1k: one exchange, no system prompt
    ("<s>[INST] Me gradué hace poco. ¿Qué hago? [/INST] Busca trabajo.\n\nSuerte. </s>",
     [U("Me gradué hace poco. ¿Qué hago?"), A("Busca trabajo.\n\nSuerte.")]),
    ("[INST] q1 [/INST] a1 [INST] q2 [/INST]", [U("q1"), A("a1"), U("q2")]),  # no tags; a final open prompt
    # timdettmers/openassistant-guanaco: no space or newline before the next marker
    ("### Human: Write a haiku.### Assistant: Leaves fall.\nSilence.### Human: Another?### Assistant: Snow. ",
     [U("Write a haiku."), A("Leaves fall.\nSilence."), U("Another?"), A("Snow.")]),
    ("<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi\n<|im_end|>\n<|im_start|>assistant\nHello!"
     "<|im_end|>\n", [S("Be kind."), U("Hi"), A("Hello!")]),
    ("<|system|>\nBe kind.\n<|user|>\nHi\n<|assistant|>\nHello!</s>\n<|user|>\nBye\n<|assistant|>\nBye!</s>",
     [S("Be kind."), U("Hi"), A("Hello!"), U("Bye"), A("Bye!")]),
    ("<|user|>\n### Human: is kept as text\n<|assistant|>\n[INST] too", [U("### Human: is kept as text"),
                                                                       A("[INST] too")]),
])
def test_text_rows(tmp_path, text, want):
    p = write_jsonl(tmp_path / "t.jsonl", [{"text": text}])
    assert dialogs(p) == [want]


def test_text_without_markers(tmp_path):
    p = write_jsonl(tmp_path / "t.jsonl", [{"text": LLAMA2_TEXT}, {"text": "Once upon a time."}])
    with pytest.raises(DataError, match=re.escape(f"{p}:2: the text starts with none of the chat markers tried "
                                                  "([INST], ### Human:, <|im_start|>, <|user|>, <|system|>")):
        list(read_dialogs(p))
    got = list(read_dialogs(p, text_as_lm=True))
    assert got[1] == {"where": f"{p}:2", "group": f"{p}:2", "text": "Once upon a time."}
    assert got[0]["messages"][0] == S("You are terse.")


@pytest.mark.parametrize("text, expect", [
    ("<s>[INST] q [/INST] a </s><s>[INST] q2 </s><s>[INST] q3 [/INST] a3", "exchange 2 of the [INST] text has no [/INST]"),
    ("[INST] <<SYS>>\nsys\n q [/INST] a", "never closes it with <</SYS>>"),
    ("<|im_start|>bot\nhi<|im_end|>", "ChatML block 1 has role 'bot'"),
    ("### Human: q### Assistant:   ", "message 1 (assistant) has empty content"),
    (" <s> ", "the text is empty"),
])
def test_bad_text_rows(tmp_path, text, expect):
    p = write_jsonl(tmp_path / "t.jsonl", [{"text": text}])
    with pytest.raises(DataError, match=re.escape(f"{p}:1: ") + ".*" + re.escape(expect)):
        list(read_dialogs(p))


# ---- OpenAssistant


def oasst_message(mid, parent, tree, role, text, lang="en", rank=None, deleted=False, synthetic=False,
                  review_result=True, tree_state="ready_for_export"):
    """One row of `*.messages.jsonl.gz` as OpenAssistant's export writes it: null fields are left out."""
    row = {"message_id": mid, "parent_id": parent, "user_id": f"user-{mid}", "created_date": "2023-02-05T14:23:50+00:00",
           "text": text, "role": role, "lang": lang, "review_count": 3, "review_result": review_result,
           "deleted": deleted, "rank": rank, "synthetic": synthetic, "model_name": None,
           "emojis": {"+1": 2}, "labels": {"quality": {"value": 0.75, "count": 3}},
           "message_tree_id": tree, "tree_state": tree_state}
    return {k: v for k, v in row.items() if v is not None}


def M(mid, parent, role, text, **kw):
    tree = {"A": "tA", "B": "tB", "C": "tC", "D": "tD", "E": "tE"}[mid[0]]
    return oasst_message(mid, parent, tree, role, text, **kw)


# Five trees, rows deliberately not in tree order (the rows of a tree are linked by parent_id):
#   A (en)  A1 r0 -> A1a r0 -> A1a2 r0 | A1a1 r1 ; A1 -> A1b r1 (a prompter leaf, not the first reply)
#           A2 r1 -> A2a (a prompter leaf, the only reply) ; A3 r2 deleted ; A4 r3 synthetic
#   B (de)  B1 (no rank, only reply) -> B1a -> B1a1 | B1a2 (no ranks, two siblings) ; B1 -> B1b -> B1b1 (no rank)
#   C (fr)  prompt failed review        D (en)  tree still growing        E (es)  E1 r0
OASST_ROWS = [
    M("A1a1", "A1a", "assistant", "6.", rank=1),
    M("A", None, "prompter", "What is 2+2?"),
    M("A1", "A", "assistant", "4.", rank=0),
    M("B", None, "prompter", "Hallo?", lang="de"),
    M("A1a", "A1", "prompter", "And 3+3?", rank=0),
    M("A1b", "A1", "prompter", "Why?", rank=1),
    M("A1a2", "A1a", "assistant", "Six.", rank=0),
    M("A2", "A", "assistant", "Four.", rank=1),
    M("A2a", "A2", "prompter", "Thanks!"),
    M("A3", "A", "assistant", "Fuor.", rank=2, deleted=True),
    M("A4", "A", "assistant", "Four!", rank=3, synthetic=True),
    M("B1", "B", "assistant", "Hallo!", lang="de"),
    M("B1a", "B1", "prompter", "Wie geht's?", lang="de"),
    M("B1b", "B1", "prompter", "Und dir?", lang="de"),
    M("B1a1", "B1a", "assistant", "Gut.", lang="de"),
    M("B1a2", "B1a", "assistant", "Schlecht.", lang="de"),
    M("B1b1", "B1b", "assistant", "Auch gut.", lang="de"),
    M("C", None, "prompter", "Bonjour", lang="fr", review_result=False),
    M("C1", "C", "assistant", "Salut", lang="fr"),
    M("D", None, "prompter", "Hi", tree_state="growing"),
    M("D1", "D", "assistant", "Hello", tree_state="growing"),
    M("E", None, "prompter", "Hola", lang="es"),
    M("E1", "E", "assistant", "¡Hola!", lang="es", rank=0),
]
T1 = [U("What is 2+2?"), A("4."), U("And 3+3?"), A("Six.")]
T2 = [U("What is 2+2?"), A("4."), U("And 3+3?"), A("6.")]
T3 = [U("What is 2+2?"), A("Four.")]
T4 = [U("Hallo?"), A("Hallo!"), U("Wie geht's?"), A("Gut.")]
T5 = [U("Hallo?"), A("Hallo!"), U("Wie geht's?"), A("Schlecht.")]
T6 = [U("Hallo?"), A("Hallo!"), U("Und dir?"), A("Auch gut.")]
T7 = [U("Hola"), A("¡Hola!")]
GROUPS = ["tA", "tA", "tA", "tB", "tB", "tB", "tE"]


def oasst_trees(rows):
    """The same messages as `*.trees.jsonl.gz` rows: one tree per line, replies nested and ordered by rank
    (unranked last) as OpenAssistant's tree export writes them; tree id and state only on the tree."""
    nodes = {r["message_id"]: {k: v for k, v in r.items() if k not in ("message_tree_id", "tree_state")}
             for r in rows}
    trees = []
    for r in rows:
        node = nodes[r["message_id"]]
        if "parent_id" in r:
            nodes[r["parent_id"]].setdefault("replies", []).append(node)
        else:
            trees.append({"message_tree_id": r["message_tree_id"], "tree_state": r["tree_state"], "prompt": node})
    for node in nodes.values():
        node.get("replies", []).sort(key=lambda m: m.get("rank", float("inf")))
    order = {"tA": 0, "tB": 1, "tC": 2, "tD": 3, "tE": 4}
    return sorted(trees, key=lambda t: order[t["message_tree_id"]])


@pytest.fixture(params=["messages.jsonl.gz", "trees.jsonl.gz", "hub parquet"])
def oasst_path(request, tmp_path):
    if request.param == "messages.jsonl.gz":
        return write_jsonl(tmp_path / "2023-04-12_oasst_ready.messages.jsonl.gz", OASST_ROWS, gzip.open)
    if request.param == "trees.jsonl.gz":
        return write_jsonl(tmp_path / "2023-04-12_oasst_ready.trees.jsonl.gz", oasst_trees(OASST_ROWS), gzip.open)
    if pq is None:
        pytest.skip("pyarrow (the [data] extra) is not installed")
    return write_hub_parquet(tmp_path / "oasst1", OASST_ROWS)


def write_hub_parquet(root, rows, rank_type=None):
    """OpenAssistant/oasst1's hub layout: data/train-0000N-of-00002.parquet, every column present (nulls), emojis
    and labels as structs of lists; the rows split between the shards in the middle of tree B."""
    rank_type = rank_type or pa.int32()
    schema = pa.schema([
        ("message_id", pa.string()), ("parent_id", pa.string()), ("user_id", pa.string()),
        ("created_date", pa.string()), ("text", pa.string()), ("role", pa.string()), ("lang", pa.string()),
        ("review_count", pa.int32()), ("review_result", pa.bool_()), ("deleted", pa.bool_()), ("rank", rank_type),
        ("synthetic", pa.bool_()), ("model_name", pa.string()),
        ("detoxify", pa.struct([("toxicity", pa.float64()), ("insult", pa.float64())])),
        ("message_tree_id", pa.string()), ("tree_state", pa.string()),
        ("emojis", pa.struct([("name", pa.list_(pa.string())), ("count", pa.list_(pa.int32()))])),
        ("labels", pa.struct([("name", pa.list_(pa.string())), ("value", pa.list_(pa.float64())),
                              ("count", pa.list_(pa.int32()))])),
    ])
    hub = []
    for r in rows:
        h = {f: r.get(f) for f in schema.names}
        h["emojis"] = {"name": list(r["emojis"]), "count": list(r["emojis"].values())}
        h["labels"] = {"name": list(r["labels"]), "value": [v["value"] for v in r["labels"].values()],
                       "count": [v["count"] for v in r["labels"].values()]}
        h["detoxify"] = {"toxicity": 0.01, "insult": 0.001}
        hub.append(h)
    (root / "data").mkdir(parents=True)
    for k, part in enumerate((hub[:13], hub[13:])):
        pq.write_table(pa.Table.from_pylist(part, schema=schema), root / "data" / f"train-0000{k}-of-00002.parquet",
                       row_group_size=4)
    return root / "data"


def test_oasst_threads(oasst_path):
    got = list(read_dialogs(oasst_path))
    assert [d["messages"] for d in got] == [T1, T2, T3, T4, T5, T6, T7]
    assert [d["group"] for d in got] == GROUPS


def test_oasst_languages_and_top_k(oasst_path):
    assert dialogs(oasst_path, oasst_lang=["en", "de"]) == [T1, T2, T3, T4, T5, T6]
    assert dialogs(oasst_path, oasst_lang=["fr"]) == []  # C failed review
    assert dialogs(oasst_path, oasst_lang=()) == [T1, T2, T3, T4, T5, T6, T7]  # none given: all
    assert dialogs(oasst_path, oasst_top_k=1) == [T1, T6, T7]
    assert dialogs(oasst_path, oasst_top_k=2) == [T1, T2, T3, T6, T7]
    assert dialogs(oasst_path, oasst_top_k=2, oasst_lang=["es"]) == [T7]


def test_oasst_where_names_file_row_and_message(tmp_path):
    p = write_jsonl(tmp_path / "m.jsonl", OASST_ROWS)
    first = next(read_dialogs(p))
    assert first["where"] == f"{p}:7 (message A1a2)"


@needs_pyarrow
def test_oasst_parquet_float_ranks(tmp_path):
    """Re-saved hub copies (through pandas) store rank as float64 with nulls."""
    folder = write_hub_parquet(tmp_path / "copy", OASST_ROWS, rank_type=pa.float64())
    assert dialogs(folder, oasst_top_k=1) == [T1, T6, T7]


def test_oasst_trailing_prompter_reply_needs_to_be_first(tmp_path):
    """A thread that ends in a prompter message counts only through its parent's first reply (by rank)."""
    rows = [M("A", None, "prompter", "q"), M("A1", "A", "assistant", "a"),
            M("A1x", "A1", "prompter", "second", rank=1), M("A1y", "A1", "prompter", "first", rank=0)]
    p = write_jsonl(tmp_path / "m.jsonl", rows)
    assert list(read_dialogs(p)) == [{"where": f"{p}:2 (message A1)", "group": "tA", "messages": [U("q"), A("a")]}]
    rows[3]["rank"] = 2
    p = write_jsonl(tmp_path / "m.jsonl", rows)
    assert len(dialogs(p)) == 1  # now A1x is first: still one dialog, never two


def test_oasst_rows_of_several_files_in_a_folder(tmp_path):
    """Trees may be cut between a folder's files; other formats in the folder come first, in file order."""
    d = tmp_path / "mix"
    d.mkdir()
    write_jsonl(d / "a-messages.jsonl", OASST_ROWS[:8])
    write_jsonl(d / "b-chat.jsonl", TULU_ROWS[:1])
    write_jsonl(d / "c-messages.jsonl.gz", OASST_ROWS[8:], gzip.open)
    assert dialogs(d) == [TULU_DIALOGS[0], T1, T2, T3, T4, T5, T6, T7]


# ---- bad input: one DataError naming the file (and row)


def test_corrupt_gzip(tmp_path):
    good = write_jsonl(tmp_path / "ok.jsonl.gz", OASST_ROWS, gzip.open).read_bytes()
    p = tmp_path / "cut.jsonl.gz"
    p.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=re.escape(f"{p}:") + r"\d+: cannot read the file"):
        list(read_dialogs(p))
    q = tmp_path / "plain.jsonl.gz"
    q.write_text(json.dumps(TULU_ROWS[0]) + "\n")  # not gzip at all
    with pytest.raises(DataError, match=re.escape(f"{q}:1: cannot read the file") + ".*gzip"):
        list(read_dialogs(q))


@needs_pyarrow
def test_corrupt_parquet(tmp_path):
    folder = write_hub_parquet(tmp_path / "oasst1", OASST_ROWS)
    p = folder / "train-00001-of-00002.parquet"
    p.write_bytes(p.read_bytes()[:-40])
    with pytest.raises(DataError, match=re.escape(f"{p}:1: cannot read the parquet file")):
        list(read_dialogs(folder))
    q = tmp_path / "x.parquet"
    q.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=re.escape(f"{q}:1: cannot read the parquet file")):
        list(iter_rows(q))


def test_parquet_without_pyarrow(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "pyarrow.parquet", None)  # import fails as if not installed
    p = tmp_path / "x.parquet"
    p.write_bytes(b"")
    with pytest.raises(DataError, match=re.escape(f"{p}: reading parquet files needs pyarrow: pip install pyarrow")):
        list(iter_rows(p))


def test_folder_without_data_files(tmp_path):
    d = tmp_path / "snap"
    (d / "data").mkdir(parents=True)
    (d / "README.md").write_text("# card")
    with pytest.raises(DataError, match=re.escape(f"{d}: the folder holds no data files")):
        list(read_dialogs(d))
    (d / "data" / "train-00000-of-00001.parquet").write_bytes(b"")
    with pytest.raises(DataError, match=re.escape(f"its subfolder data/ has some: pass {d / 'data'}")):
        data_files(d)
    with pytest.raises(DataError, match=re.escape(f"data file {tmp_path / 'nope.jsonl'} does not exist")):
        list(read_dialogs(tmp_path / "nope.jsonl"))


def test_oasst_rows_without_parent_id(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "parent_id"} for r in OASST_ROWS]
    p = write_jsonl(tmp_path / "m.jsonl", rows)
    # row 1 (A1a1) is taken as tree A's root until row 2 (A) shows that A1a1 lacked its parent_id
    with pytest.raises(DataError, match=re.escape(f"{p}:2: OpenAssistant message A has no 'parent_id'")):
        list(read_dialogs(p))
    rows = [{k: v for k, v in r.items() if k != "message_tree_id"} for r in OASST_ROWS]
    p = write_jsonl(tmp_path / "m.jsonl", rows)
    with pytest.raises(DataError, match=re.escape(f"{p}:1: OpenAssistant message A1a1 has no 'message_tree_id'")):
        list(read_dialogs(p))


def test_oasst_broken_trees(tmp_path):
    p = write_jsonl(tmp_path / "m.jsonl", OASST_ROWS[:1] + OASST_ROWS[2:])  # A (the root of tree A) is missing
    with pytest.raises(DataError, match=re.escape(f"{p}:2: OpenAssistant message A1: its parent A is not in the data")):
        list(read_dialogs(p))
    bad = json.loads(json.dumps(oasst_trees(OASST_ROWS)))
    del bad[1]["prompt"]["replies"][0]["replies"][1]["text"]  # B1b
    p = write_jsonl(tmp_path / "t.jsonl", bad)
    with pytest.raises(DataError, match=re.escape(f"{p}:2: OpenAssistant message B1b has no 'text'")):
        list(read_dialogs(p))


def test_mixed_formats_in_one_file(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", TULU_ROWS[:2] + [{"text": LLAMA2_TEXT}])
    with pytest.raises(DataError, match=re.escape(f"{p}:3: row is a text row but the file's first row ({p}:1) "
                                                  "is chat messages")):
        list(read_dialogs(p))


@pytest.mark.parametrize("line, expect", [
    (b'{"messages": [', "d.jsonl:2: not valid JSON"),
    (b'{"text": "caf\xe9"}', "d.jsonl:2: not UTF-8 text"),
    (b'{"prompt": "x", "completion": "y"}', "d.jsonl:2: row has no recognisable format"),
    (b'[1, 2]', "d.jsonl:2: expected a JSON object, got list"),
    (b'{"messages": [{"role": "bot", "content": "x"}]}', "d.jsonl:2: message 0 has unknown role 'bot'"),
    (b'{"messages": [{"role": "user", "content": "  "}]}', "d.jsonl:2: message 0 (user) has empty content"),
    (b'{"messages": []}', "d.jsonl:2: the dialog is empty"),
    (b'{"conversations": [{"from": "robot", "value": "x"}]}', "d.jsonl:2: ShareGPT turn"),
])
def test_bad_rows_name_file_and_line(tmp_path, line, expect):
    p = tmp_path / "d.jsonl"
    first = {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]} if b"conv" in line \
        else TULU_ROWS[0]  # a good row of the same format first
    p.write_bytes(json.dumps(first).encode() + b"\n" + line + b"\n")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}/{expect}")):
        list(read_dialogs(p))


# ---- malformed values (found by fuzzing): each a DataError naming the row and the field, never another exception

SHARE_OK = {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]}


@pytest.mark.parametrize("row, expect", [
    ({"conversations": [{"from": ["human"], "value": "x"}]}, "ShareGPT turn {'from': ['human'], 'value': 'x'} has no "
                                                              "known 'from'"),
    ({"conversations": [{"from": {"a": 1}, "value": "x"}]}, "ShareGPT turn {'from': {'a': 1}, 'value': 'x'} has no "
                                                             "known 'from'"),
    ({"messages": [{"role": ["user"], "content": "x"}]}, "message 0 has unknown role ['user']"),
])
def test_unhashable_roles(tmp_path, row, expect):
    p = write_jsonl(tmp_path / "d.jsonl", [SHARE_OK if "conversations" in row else TULU_ROWS[0], row])
    with pytest.raises(DataError, match=re.escape(f"{p}:2: {expect}")):
        list(read_dialogs(p))


@pytest.mark.parametrize("field, value, expect", [
    ("role", ["prompter"], "OpenAssistant message A has role ['prompter']; expected prompter or assistant"),
    ("role", {"r": 1}, "OpenAssistant message A has role {'r': 1}; expected prompter or assistant"),
    ("message_id", ["A"], "OpenAssistant message ['A']: 'message_id' must be a string or an integer, got list"),
    ("parent_id", {"id": "A"}, "OpenAssistant message A1: 'parent_id' must be a string or an integer, got dict"),
])
def test_oasst_unhashable_fields(tmp_path, field, value, expect):
    rows = json.loads(json.dumps(OASST_ROWS[1:3]))  # A, then A1 replying to it
    rows[1 if field == "parent_id" else 0][field] = value
    p = write_jsonl(tmp_path / "m.jsonl", rows)
    with pytest.raises(DataError, match=re.escape(f"{p}:{2 if field == 'parent_id' else 1}: {expect}")):
        list(read_dialogs(p))
    if field == "role":  # the same message in a tree row
        tree = {"message_tree_id": "tA", "prompt": {k: v for k, v in rows[0].items() if k != "message_tree_id"}}
        p = write_jsonl(tmp_path / "t.jsonl", [tree])
        with pytest.raises(DataError, match=re.escape(f"{p}:1: {expect}")):
            list(read_dialogs(p))


def deep_tree(depth: int) -> str:
    """An OASST tree row whose one thread is `depth` messages long: each reply nests an object in a list."""
    head = "".join(f'{{"message_id": "m{i}", "role": "{("prompter", "assistant")[i % 2]}", "text": "t{i}", '
                   f'"review_result": true, "replies": [' for i in range(depth))
    return '{"message_tree_id": "t", "prompt": ' + head + "]}" * depth + "}"


@pytest.mark.parametrize("name", ["t.jsonl", "t.json"])
def test_oasst_tree_nested_deeper_than_the_json_reader(tmp_path, name):
    p = tmp_path / name
    row = deep_tree(3000)
    p.write_text(f"[{row}]" if name == "t.json" else row + "\n")
    with pytest.raises(DataError, match=re.escape(f"{p}:1: cannot read the JSON: it nests deeper than Python's JSON "
                                                  "reader allows")):
        list(read_dialogs(p))
    p.write_text(deep_tree(40) + "\n")  # a long thread the reader takes: one dialog of 40 messages
    assert [len(m) for m in dialogs(p)] == [40]


def test_integer_longer_than_python_reads(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(TULU_ROWS[0]) + '\n{"messages": [{"role": "user", "content": ' + "9" * 5000 + "}]}\n")
    with pytest.raises(DataError, match=re.escape(f"{p}:2: cannot read the JSON: Exceeds the limit (4300 digits)")):
        list(read_dialogs(p))
    q = tmp_path / "d.json"
    q.write_text(f"[{json.dumps(TULU_ROWS[0])}, " + '{"text": ' + "9" * 5000 + "}]")
    with pytest.raises(DataError, match=re.escape(f"{q}:2: cannot read the JSON: Exceeds the limit (4300 digits)")):
        list(read_dialogs(q))


@pytest.mark.parametrize("row, expect", [
    ({"messages": [U("caf\ud800"), A("x")]}, "message 0 (user): the text holds a lone surrogate '\\ud800' at "
                                               "character 3"),
    ({"instruction": "q", "input": "\udfff", "output": "a"}, "message 0 (user): the text holds a lone surrogate "
                                                               "'\\udfff'"),
    ({"text": "[INST] q [/INST] a\udc80"}, "message 1 (assistant): the text holds a lone surrogate '\\udc80'"),
])
def test_lone_surrogates(tmp_path, row, expect):
    """A JSON \\ud800 escape without its pair decodes to a str that is not Unicode text (SentencePiece cannot take
    it)."""
    p = write_jsonl(tmp_path / "d.jsonl", [row])
    with pytest.raises(DataError, match=re.escape(f"{p}:1: {expect}")):
        list(read_dialogs(p))


def test_lone_surrogate_in_a_text_trained_whole(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": "plain \ud800 text"}])
    with pytest.raises(DataError, match=re.escape(f"{p}:1: 'text' holds a lone surrogate '\\ud800' at character 6")):
        list(read_dialogs(p, text_as_lm=True))


# ---- OpenAI / Hugging Face content parts


def parts(*texts):
    return [{"type": "text", "text": t} for t in texts]


def test_content_parts_are_joined_with_nothing_between(tmp_path):
    rows = [{"messages": [{"role": "system", "content": parts("Be ", "brief.")},
                          {"role": "user", "content": parts("What is ", "2+2", "?")},
                          {"role": "assistant", "content": parts("4.")}]},
            {"messages": [U("Hi"), {"role": "assistant", "content": parts("Hello", "\n", "there.")}]}]
    assert dialogs(write_jsonl(tmp_path / "c.jsonl", rows)) == [[S("Be brief."), U("What is 2+2?"), A("4.")],
                                                               [U("Hi"), A("Hello\nthere.")]]
    share = [{"conversations": [{"from": "human", "value": parts("Hot", "?")}, {"from": "gpt", "value": "Cold."}]}]
    assert dialogs(write_jsonl(tmp_path / "s.jsonl", share)) == [[U("Hot?"), A("Cold.")]]


@pytest.mark.parametrize("content, expect", [
    ([{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "cat.png"}}],
     "message 1: content part 1 has type 'image_url'; only text parts can be trained on"),
    ([{"type": "input_audio", "input_audio": {"data": "...", "format": "wav"}}],
     "message 1: content part 0 has type 'input_audio'"),
    ([{"text": "no type"}], "message 1: content part 0 has type None"),
    (["plain"], "message 1: content part 0 is str; expected {\"type\": \"text\", \"text\": ...}"),
    ([{"type": "text", "text": ["x"]}], "message 1: content part 0: 'text' must be a string, got list"),
    ([], "message 1 (assistant) has empty content"),
])
def test_bad_content_parts(tmp_path, content, expect):
    p = write_jsonl(tmp_path / "c.jsonl", [{"messages": [U("q"), {"role": "assistant", "content": content}]}])
    with pytest.raises(DataError, match=re.escape(f"{p}:1: {expect}")):
        list(read_dialogs(p))


# ---- bad_rows="skip": the bad rows are records, the rest reads on


def test_skip_records_and_the_fraction_cap(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b"\n".join([json.dumps(TULU_ROWS[0]).encode(), b'{"messages": [', b'{"q": 1}',
                              json.dumps(TULU_ROWS[1]).encode(), b'{"messages": [{"role": "bot", "content": "x"}]}',
                              b"", json.dumps(TULU_ROWS[2]).encode()]) + b"\n")
    got = list(read_dialogs(p, bad_rows="skip", max_bad_fraction=0.5))
    assert [d.get("messages") for d in got] == [TULU_DIALOGS[0], None, None, TULU_DIALOGS[1], None, TULU_DIALOGS[2]]
    assert [(d["where"], d.get("skipped")) for d in got if "skipped" in d] == [
        (f"{p}:2", "invalid_json"), (f"{p}:3", "unknown_format"), (f"{p}:5", "invalid_dialog")]
    assert got[4]["error"] == f"{p}:5: message 0 has unknown role 'bot'; expected one of system, user, assistant"
    with pytest.raises(DataError, match=re.escape(f"{p}: 3 of its 6 rows are bad, more than --max-bad-fraction 0.4 "
                                                  f"allows: probably a wrong --template or data format rather than a "
                                                  f"few broken rows. The first: {p}:2: not valid JSON")):
        list(read_dialogs(p, bad_rows="skip", max_bad_fraction=0.4))
    with pytest.raises(DataError, match=re.escape(f"{p}:2: not valid JSON")):  # the default is error
        list(read_dialogs(p))


def test_skip_a_template_cannot_render(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"messages": [U("q"), U("again"), A("a")]}, TULU_ROWS[0]])
    assert len(dialogs(p)) == 2  # any template but llama2 takes two user turns in a row
    got = list(read_dialogs(p, template="llama2", bad_rows="skip", max_bad_fraction=1))
    assert got[0]["error"] == (f"{p}:1: message 1 is 'user' where llama2 needs 'assistant': its turns must alternate "
                               "user/assistant, starting with user (after an optional system message)")
    assert got[1]["messages"] == TULU_DIALOGS[0]


def test_skip_oasst_messages_take_their_replies_along(tmp_path):
    rows = json.loads(json.dumps(OASST_ROWS))
    rows[2]["role"] = ["assistant"]  # A1 (line 3): its replies A1a, A1b and theirs, A1a1, A1a2, go with it
    p = write_jsonl(tmp_path / "m.jsonl", rows)
    got = list(read_dialogs(p, bad_rows="skip", max_bad_fraction=1))
    assert [d["messages"] for d in got if "messages" in d] == [T3, T4, T5, T6, T7]
    skipped = sorted((int(d["where"].rpartition(":")[2]), d["error"].partition(": ")[2]) for d in got if "skipped" in d)
    assert skipped == [(1, "OpenAssistant message A1a1 replies to A1a, which was left out"),
                       (3, "OpenAssistant message A1 has role ['assistant']; expected prompter or assistant"),
                       (5, "OpenAssistant message A1a: its parent A1 is not in the data"),
                       (6, "OpenAssistant message A1b: its parent A1 is not in the data"),
                       (7, "OpenAssistant message A1a2 replies to A1a, which was left out")]
    assert {d["skipped"] for d in got if "skipped" in d} == {"invalid_oasst"}
    # a parent loop (tree D has no root): each of its rows is left out, the other trees read on
    rows = json.loads(json.dumps(OASST_ROWS))
    rows[19]["parent_id"] = "D1"  # D (line 20) replies to D1, which replies to D
    p = write_jsonl(tmp_path / "m.jsonl", rows)
    got = list(read_dialogs(p, bad_rows="skip", max_bad_fraction=1))
    assert [d["messages"] for d in got if "messages" in d] == [T1, T2, T3, T4, T5, T6, T7]
    no_root = "OpenAssistant tree tD has no root message"
    assert [(d["where"], d["error"].partition(": ")[2][:41]) for d in got if "skipped" in d] == [
        (f"{p}:20", no_root), (f"{p}:21", no_root)]
    with pytest.raises(DataError, match=re.escape(f"{p}:20: OpenAssistant tree tD has no root message")):
        list(read_dialogs(p))


def test_skip_oasst_tree_rows_whole(tmp_path):
    trees = json.loads(json.dumps(oasst_trees(OASST_ROWS)))
    del trees[1]["prompt"]["replies"][0]["replies"][1]["text"]  # B1b, deep in tree B (line 2)
    p = write_jsonl(tmp_path / "t.jsonl", trees)
    got = list(read_dialogs(p, bad_rows="skip", max_bad_fraction=1))
    assert [d.get("messages") for d in got] == [T1, T2, T3, None, T7]
    assert got[3]["where"] == f"{p}:2" and got[3]["error"].startswith(f"{p}:2: OpenAssistant message B1b has no 'text'")
