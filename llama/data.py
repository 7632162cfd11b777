"""Training data files -> dialogs.

Containers: `.jsonl` (one object per line), `.json` (an array of objects, or one object per line), their
`.gz` forms, `.parquet` (through pyarrow, the optional `[data]` extra; read a batch of rows at a time), and a
folder of such files (its data files in name order, not its subfolders). Rows are streamed: no file is held
as one string.

Formats, detected per file from its first row (every row of a file must have the same one):

  chat          {"messages": [{"role", "content"}, ...]}; other keys (Tulu 2's "dataset", "id") are ignored
  sharegpt      {"conversations": [{"from": "human"|"gpt"|"system"|..., "value"}, ...]}
  alpaca        {"instruction", "input", "output"}: the input rides on the user message as "input"
  oasst_message OpenAssistant message rows {"message_id", "parent_id", "message_tree_id", "role", "text", ...}
                (the hub's parquet, `*.messages.jsonl.gz`), linked into trees
  oasst_tree    OpenAssistant trees {"message_tree_id", "tree_state", "prompt": {..., "replies": [...]}}
                (`*.trees.jsonl.gz`); both OpenAssistant forms give one dialog per thread (rules below)
  text          {"text"} in a chat form: Llama-2 [INST], Guanaco "### Human:", ChatML, Tulu "<|user|>"

A message's content may be a string or a list of OpenAI / Hugging Face content parts,
[{"type": "text", "text": "..."}, ...]: the text parts are joined in order with nothing between them (as Hugging
Face's chat templates render parts; vLLM's server joins them with "\n" instead); a part of any other type is
an error naming it.

Every dialog is checked by `llama.chat.validate_dialog`; bad data is a DataError naming `file:row` (the line
of a .jsonl, the 1-based index of the row in a .json array or a parquet file). With bad_rows="skip" a bad row
is left out instead (see `read_dialogs`); problems of a whole file (an unreadable gzip, parquet or .json array,
rows of two formats) stop the reading either way.
"""
import gzip
import io
import json
import math
import re
import sys
import zlib
from collections.abc import Iterable, Iterator, Sequence
from functools import partial
from pathlib import Path

from .chat import validate_dialog

DATA_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet")
BOM = b"\xef\xbb\xbf"  # a UTF-8 byte order mark, which some editors put first in a file
JSON_CHUNK = 1 << 20  # characters of a .json array read at a time
JSON_SPACE = re.compile(r"[ \t\r\n]*")  # the white space JSON allows between values
BAD_ROWS = ("error", "skip")
BAD_ROW_REASONS = ("invalid_json", "unknown_format", "invalid_dialog", "invalid_oasst")  # a skipped row's reason
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class DataError(ValueError):
    """Bad user data; the message names the file and the row. A message that quotes a huge value is cut in the
    middle: its start says where and what, its end what was expected."""

    def __init__(self, message: str):
        if len(message) > 1000:
            message = f"{message[:700]} [... {len(message) - 900:,} characters ...] {message[-200:]}"
        super().__init__(message)


def parse_data_spec(spec: str) -> tuple[Path, float]:
    """`path` or `path:fraction` (the share of that file or folder to use, as in dataset mixes)."""
    path, _, frac = spec.rpartition(":")
    if path and frac.replace(".", "", 1).isdigit():
        fraction = float(frac)
        if not 0 < fraction <= 1:
            raise DataError(f"--data {spec}: fraction must be in (0, 1], got {fraction}")
        return Path(path), fraction
    return Path(spec), 1.0


def is_data_file(path: Path) -> bool:
    return path.name.lower().endswith(DATA_SUFFIXES)


def data_files(path: Path) -> list[Path]:
    """A file -> [file]; a folder -> its data files, sorted by name."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and is_data_file(p) and not p.name.startswith("."))
    if not files:
        sub = [d.name for d in sorted(path.iterdir()) if d.is_dir() and any(map(is_data_file, d.iterdir()))]
        hint = f"; its subfolder {sub[0]}/ has some: pass {path / sub[0]}" if sub else ""
        raise DataError(f"{path}: the folder holds no data files (expected {', '.join(DATA_SUFFIXES)}){hint}")
    return files


# ---------------------------------------------------------------------------------------------------------
# Containers -> rows.


def iter_rows(path: Path, bad_lines: bool = False) -> Iterator[tuple[int, dict | DataError]]:
    """(row number from 1, row) of one data file; a .jsonl row's number is its line. With `bad_lines`, a line
    that is not JSON is yielded as (n, the DataError) instead of raised, and reading goes on."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".parquet"):
        yield from _parquet_rows(path)
        return
    n = 0
    try:
        with (gzip.open(path, "rb") if name.endswith(".gz") else open(path, "rb")) as f:
            start = f.read(4096).removeprefix(BOM).lstrip()[:1]
            f.seek(0)
            if start == b"[":
                for n, row in _json_array_rows(path, f):
                    yield n, row
                return
            rows = 0
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:  # without its line end, so that an error at the end of the line has the line's column
                    row = json.loads(line.decode("utf-8-sig" if n == 1 else "utf-8").rstrip("\r\n"))
                except UnicodeDecodeError as e:
                    row = DataError(f"{path}:{n}: not UTF-8 text ({e.reason} at byte {e.start} of the line)")
                except json.JSONDecodeError as e:
                    if not rows and not is_data_file(path):  # e.g. a .csv: say what is read instead
                        kind = f"a {path.suffix} file" if path.suffix else "a file without a suffix"
                        kind = {".csv": "CSV", ".tsv": "TSV"}.get(path.suffix.lower(), kind)
                        raise DataError(f"{path}: {kind} is not supported (line {n} is not JSON); data files are "
                                        f"{', '.join(DATA_SUFFIXES)} or a folder of them") from None
                    row = DataError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno}); "
                                    "expected one JSON object per line")
                except (ValueError, RecursionError) as e:
                    row = DataError(f"{path}:{n}: cannot read the JSON: {_json_limit(e)}")
                if isinstance(row, DataError) and not bad_lines:
                    raise row
                rows += 1
                yield n, row
    except UnicodeDecodeError as e:  # in a .json array (a .jsonl line's is caught above)
        raise DataError(f"{path}:{n + 1}: not UTF-8 text ({e.reason})") from None
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}:{n + 1}: cannot read the file: {_one_line(e)}") from None


def _one_line(e: Exception) -> str:
    """A library's error message on one line (pyarrow's may span several)."""
    return " ".join(str(e).split())


def _json_limit(e: Exception) -> str:
    """Why Python's JSON reader gave up on text that may be valid JSON: one of its limits."""
    if isinstance(e, RecursionError):
        return (f"it nests deeper than Python's JSON reader allows (about {sys.getrecursionlimit()} levels of objects "
                "and lists; an OpenAssistant tree row nests two per reply)")
    return str(e).split(":")[0]  # "Exceeds the limit (4300 digits) for integer string conversion"


def _json_array_rows(path: Path, f) -> Iterator[tuple[int, object]]:
    """Rows of a JSON array, decoded one element at a time from a growing text buffer."""
    text = io.TextIOWrapper(f, encoding="utf-8-sig")
    decoder = json.JSONDecoder()
    buf, pos, n, eof = "", 0, 0, False

    def more() -> bool:
        nonlocal buf, pos, eof
        got = text.read(max(JSON_CHUNK, len(buf) - pos))  # doubling: an element larger than a chunk costs O(size)
        buf, pos, eof = buf[pos:] + got, 0, not got
        return bool(got)

    def peek() -> str:
        """The next character that is not white space ("" at the end of the file), reading on as needed."""
        nonlocal pos
        while True:
            pos = JSON_SPACE.match(buf, pos).end()
            if pos < len(buf) or not more():
                return buf[pos: pos + 1]

    assert peek() == "["
    pos += 1
    while (c := peek()) != "]":
        if not c:
            raise DataError(f"{path}:{n + 1}: not valid JSON (the array is not closed)")
        if n:
            if c != ",":
                raise DataError(f"{path}:{n + 1}: not valid JSON (expected ',' or ']' after row {n})")
            pos += 1
            peek()
        while True:
            try:
                row, end = decoder.raw_decode(buf, pos)
                if end == len(buf) and not eof:  # a number may continue in the next chunk
                    raise json.JSONDecodeError("truncated", buf, end)
                break
            except json.JSONDecodeError as e:
                # An element cut by the chunk end looks like bad JSON: read on; at the end of the file it is bad.
                if not more():
                    raise DataError(f"{path}:{n + 1}: not valid JSON ({e.msg}); expected a JSON array of objects")
            except (ValueError, RecursionError) as e:
                raise DataError(f"{path}:{n + 1}: cannot read the JSON: {_json_limit(e)}") from None
        n += 1
        pos = end
        yield n, row


def _parquet_rows(path: Path) -> Iterator[tuple[int, dict]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet files needs pyarrow: pip install pyarrow "
                        "(or this project's [data] extra)") from None
    n = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                n += 1
                yield n, row
    except (OSError, ValueError, pa.ArrowException) as e:  # ArrowInvalid is a ValueError, ArrowIOError an OSError
        raise DataError(f"{path}:{n + 1}: cannot read the parquet file: {_one_line(e)}") from None


# ---------------------------------------------------------------------------------------------------------
# Rows -> dialogs.


def read_dialogs(path: Path, *, oasst_top_k: int = 0, oasst_lang: Sequence[str] | None = None,
                 text_as_lm: bool = False, template: str | None = None, bad_rows: str = "error",
                 max_bad_fraction: float = 0.01) -> Iterator[dict]:
    """Samples of a data file or folder: {"where": "file:row", "group": str, "messages": [...]}, or
    {"where", "group", "text"} for a text row without chat markers when `text_as_lm` (trained whole).

    Order: files in name order, rows in file order; OASST message rows are gathered over the whole folder (a
    hub snapshot cuts its shards anywhere in a tree) and their threads come last, trees in order of first
    appearance, threads depth first. "group" is what a train/val split draws by: the OASST tree, else the row.

    `template` also checks each dialog against that chat template (llama2's alternation, alpaca's single turn),
    so a dialog it cannot render is a bad row here rather than when it is tokenized. A bad row is a DataError;
    with bad_rows="skip" it is yielded as {"where": "file:row", "skipped": reason (one of BAD_ROW_REASONS),
    "error": the DataError's message} and reading goes on, unless more than `max_bad_fraction` of a file's rows
    are bad (that is a wrong format or template rather than a few broken rows). An OASST thread that breaks the
    rules counts as a bad row of the file of its last message; a message row left out takes its replies along.
    """
    if bad_rows not in BAD_ROWS:
        raise ValueError(f"bad_rows must be one of {BAD_ROWS}, got {bad_rows!r}")
    if not 0 <= max_bad_fraction <= 1:
        raise DataError(f"--max-bad-fraction must be in [0, 1], got {max_bad_fraction}")
    skip = bad_rows == "skip"
    n_rows: dict[str, int] = {}  # per file: rows read
    n_bad: dict[str, list] = {}  # per file: [bad rows, the first one's message]

    def counted(samples: Iterable[dict]) -> Iterator[dict]:
        for s in samples:
            if "skipped" in s:
                n_bad.setdefault(s["where"].rpartition(":")[0], [0, s["error"]])[0] += 1
            yield s

    def check_fraction(file: str) -> None:
        bad, first = n_bad.get(file, (0, ""))
        if bad > max_bad_fraction * n_rows[file]:
            raise DataError(f"{file}: {bad} of its {n_rows[file]} rows are bad, more than --max-bad-fraction "
                            f"{max_bad_fraction} allows: probably a wrong --template or data format rather than a few "
                            f"broken rows. The first: {first}")

    oasst_rows: dict[str, dict] = {}
    threads = partial(oasst_dialogs, top_k=oasst_top_k, langs=oasst_lang, template=template, skip=skip)
    row_samples = partial(_row_samples, oasst_rows=oasst_rows, threads=threads, text_as_lm=text_as_lm,
                          template=template, skip=skip)
    for file in data_files(Path(path)):
        n_rows[str(file)] = 0
        for samples in _file_samples(file, row_samples, skip):
            n_rows[str(file)] += 1
            yield from counted(samples)
        check_fraction(str(file))
    roots, left_out = link_oasst_messages(oasst_rows, skip)
    yield from counted(left_out)
    for root in roots:
        yield from counted(threads(root))
    for file in n_rows:
        check_fraction(file)


def _file_samples(file: Path, row_samples, skip: bool) -> Iterator[Iterable[dict]]:
    """Each row of one file -> its samples (`row_samples`: _row_samples with read_dialogs' options); every row
    must have the format of the file's first row."""
    fmt = first = None  # the format of the file's first row, and where that is
    for n, row in iter_rows(file, bad_lines=skip):
        where = f"{file}:{n}"
        try:
            if isinstance(row, DataError):  # a line that is not JSON (yielded only with bad_lines)
                raise row
            f = row_format(row, where)
        except DataError as e:
            yield [_bad(e, where, "invalid_json" if row is e else "unknown_format", skip)]
            continue
        if fmt is None:
            fmt, first = f, where
        elif f != fmt:
            raise DataError(f"{where}: row is {FORMATS[f][1]} but the file's first row ({first}) is "
                            f"{FORMATS[fmt][1]}; every row of a file must have the same format")
        yield row_samples(row, fmt, where)


def _row_samples(row: dict, fmt: str, where: str, oasst_rows: dict[str, dict], threads, text_as_lm: bool,
                 template: str | None, skip: bool) -> Iterable[dict]:
    """One row of format `fmt` -> its samples (`threads`: oasst_dialogs with read_dialogs' options). An OASST
    message row gives none: it is kept in `oasst_rows`, to be linked into trees at the end."""
    try:
        if fmt == "oasst_message":
            add_oasst_message(oasst_rows, row, where)
            return []
        if fmt == "oasst_tree":
            return threads(oasst_tree_node(row, where))
        if fmt != "text":
            return [{"where": where, "group": where, "messages": to_messages(row, fmt, where, template)}]
        msgs = text_to_messages(row["text"], where, text_as_lm, template)
    except DataError as e:
        return [_bad(e, where, "invalid_oasst" if fmt.startswith("oasst") else "invalid_dialog", skip)]
    if not msgs:  # a text without chat markers, with text_as_lm: trained whole
        return [{"where": where, "group": where, "text": row["text"]}]
    return [{"where": where, "group": where, "messages": msgs}]


def _bad(e: DataError, where: str, reason: str, skip: bool) -> dict:
    """With `skip`, the record that stands for a bad row in read_dialogs' output; otherwise `e` is raised."""
    if not skip:
        raise e
    return {"where": where, "skipped": reason, "error": str(e)}


FORMATS = {  # format: (the keys that identify its rows, tried in this order; its name in errors)
    "chat": (("messages",), "chat messages"),
    "sharegpt": (("conversations",), "ShareGPT"),
    "alpaca": (("instruction", "output"), "Alpaca"),
    "oasst_message": (("message_id",), "an OpenAssistant message"),
    "oasst_tree": (("message_tree_id", "prompt"), "an OpenAssistant tree"),
    "text": (("text",), "a text row"),
}


def row_format(row, where: str) -> str:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for fmt, (keys, _) in FORMATS.items():
        if all(k in row for k in keys):
            return fmt
    raise DataError(f"{where}: row has no recognisable format; expected {{\"messages\": [...]}}, "
                    "Alpaca {\"instruction\", \"input\", \"output\"}, ShareGPT {\"conversations\": [...]}, "
                    "an OpenAssistant message {\"message_id\", \"parent_id\", ...} or tree "
                    "{\"message_tree_id\", \"prompt\"}, or {\"text\"}; "
                    f"found keys {sorted(row)}")


def to_messages(row: dict, fmt: str, where: str, template: str | None = None) -> list[dict]:
    """One row of a row-per-dialog format (chat, sharegpt, alpaca) -> checked [{"role", "content"}, ...]."""
    if fmt == "chat":
        msgs = row["messages"]
    elif fmt == "sharegpt":
        msgs = []
        for turn in row["conversations"] if isinstance(row["conversations"], list) else [None]:
            role = turn.get("from") if isinstance(turn, dict) else None
            if not isinstance(role, str) or role not in SHAREGPT_ROLES:
                raise DataError(f"{where}: ShareGPT turn {_short(turn)} has no known 'from' "
                                f"(expected one of {sorted(SHAREGPT_ROLES)})")
            msgs.append({"role": SHAREGPT_ROLES[role], "content": turn.get("value")})
    else:  # alpaca: the input, when present, follows the instruction
        assert fmt == "alpaca", fmt
        user = {"role": "user", "content": row["instruction"]}
        if row.get("input"):
            user["input"] = row["input"]
        msgs = [user, {"role": "assistant", "content": row["output"]}]
    return check_dialog(msgs, where, template)


def join_text_parts(msgs, where: str):
    """The messages with any content given as a list of content parts joined into one string (see the module
    docstring); `msgs` itself when there is none. Anything else is left to check_dialog."""
    if not isinstance(msgs, list) or not any(isinstance(m, dict) and isinstance(m.get("content"), list) for m in msgs):
        return msgs
    out = []
    for i, m in enumerate(msgs):
        if isinstance(m, dict) and isinstance(m.get("content"), list):
            texts = []
            for k, part in enumerate(m["content"]):
                what = f"{where}: message {i}: content part {k}"
                if not isinstance(part, dict):
                    raise DataError(f"{what} is {type(part).__name__}; expected {{\"type\": \"text\", \"text\": ...}}")
                if part.get("type") != "text":
                    raise DataError(f"{what} has type {_short(part.get('type'))}; only text parts can be trained on "
                                    "({\"type\": \"text\", \"text\": ...})")
                if not isinstance(part.get("text"), str):
                    raise DataError(f"{what}: 'text' must be a string, got {type(part.get('text')).__name__}")
                texts.append(part["text"])
            m = {**m, "content": "".join(texts)}
        out.append(m)
    return out


def check_dialog(msgs, where: str, template: str | None = None) -> list[dict]:
    """The dialog with its content parts joined, checked by validate_dialog (for `template` when given) and for
    lone surrogates; any problem is a DataError naming `where`."""
    try:
        checked = validate_dialog(msgs, template)
    except ValueError as e:
        joined = join_text_parts(msgs, where)  # parts are rare: looked for only when the plain check fails
        if joined is msgs:
            raise DataError(f"{where}: {e}") from None
        return check_dialog(joined, where, template)
    try:  # one pass over the whole dialog; which text, only when it fails
        "".join([m["content"] + m.get("input", "") for m in checked]).encode("utf-8")
    except UnicodeEncodeError:
        for i, m in enumerate(checked):
            for text in (m["content"], m.get("input", "")):
                check_unicode(text, where, f"message {i} ({m['role']}): the text")
    return msgs


def check_unicode(text: str, where: str, what: str) -> None:
    """A str decoded from JSON may hold a lone surrogate (a \\ud800 escape without its pair): that is not Unicode
    text, and SentencePiece cannot take it."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise DataError(f"{where}: {what} holds a lone surrogate {text[e.start]!r} at character {e.start} (a JSON "
                            "\\ud800-style escape without its pair), which is not Unicode text") from None


def _short(value) -> str:
    """repr(value), cut to 80 characters: error messages quote values, which may be huge."""
    r = repr(value)
    return r if len(r) <= 80 else r[:77] + "..."


# ---------------------------------------------------------------------------------------------------------
# Text rows in a chat form -> turns. Each turn's content is stripped of surrounding whitespace and of the
# <s> / </s> tags around it; the markers themselves are dropped (the template puts its own back). The forms
# and their parsers: TEXT_FORMS, below them.


def text_to_messages(text, where: str, text_as_lm: bool = False, template: str | None = None) -> list[dict] | None:
    """A {"text"} row -> messages, from the chat markers the text starts with (after an optional <s>).
    None (train the text whole) when it has none and `text_as_lm`; otherwise that is a DataError."""
    if not isinstance(text, str):
        raise DataError(f"{where}: 'text' must be a string, got {type(text).__name__}")
    s = _untag(text, head=True)
    if not s:
        raise DataError(f"{where}: the text is empty")
    parse = next((f for marker, f in TEXT_FORMS.items() if s.startswith(marker)), None)
    if parse is None:
        if text_as_lm:
            check_unicode(text, where, "'text'")
            return None
        raise DataError(f"{where}: the text starts with none of the chat markers tried ({', '.join(TEXT_FORMS)}, "
                        f"after an optional <s>): {text[:60]!r}; to train on whole texts as plain language "
                        "modelling, pass --text-as-lm")
    return check_dialog(parse(s, where), where, template)


def _untag(s: str, head: bool = False) -> str:
    """s stripped of whitespace and of <s> / </s> tags at its end (and at its start when `head`)."""
    while True:
        t = s.strip()
        for tag in ("<s>", "</s>"):
            t = t.removesuffix(tag)
            if head:
                t = t.removeprefix(tag)
        if t == s:
            return t
        s = t


def _llama2_turns(s: str, where: str) -> list[dict]:
    exchanges = s.split("[INST]")[1:]
    msgs = []
    for k, ex in enumerate(exchanges):
        q, sep, a = ex.partition("[/INST]")
        if not sep and k < len(exchanges) - 1:
            raise DataError(f"{where}: exchange {k + 1} of the [INST] text has no [/INST]")
        q = q.strip()
        if k == 0 and q.startswith("<<SYS>>"):
            system, sep, q = q.removeprefix("<<SYS>>").partition("<</SYS>>")
            if not sep:
                raise DataError(f"{where}: the [INST] text opens <<SYS>> but never closes it with <</SYS>>")
            msgs.append({"role": "system", "content": system.strip()})
        msgs.append({"role": "user", "content": _untag(q)})
        a = _untag(a)
        if a or k < len(exchanges) - 1:  # a final [INST] without a reply is a prompt: kept, not trained
            msgs.append({"role": "assistant", "content": a})
    return msgs


def _split_turns(s: str, where: str, pattern: str, roles: dict) -> list[dict]:
    """Turns that each open with a marker `pattern` matches; its group names the role (a key of `roles`)."""
    parts = re.split(pattern, s)  # [text before the first marker (empty), marker, content, marker, ...]
    return [{"role": roles[m], "content": _untag(c)} for m, c in zip(parts[1::2], parts[2::2])]


def _chatml_turns(s: str, where: str) -> list[dict]:
    msgs = []
    for k, block in enumerate(s.split("<|im_start|>")[1:]):
        role, _, rest = block.partition("\n")
        content, _, after = rest.partition("<|im_end|>")
        if role.strip() not in ("system", "user", "assistant"):
            raise DataError(f"{where}: ChatML block {k + 1} has role {role.strip()!r}; expected system, user "
                            "or assistant")
        if _untag(after):
            raise DataError(f"{where}: text after <|im_end|> of ChatML block {k + 1}: {_untag(after)[:40]!r}")
        msgs.append({"role": role.strip(), "content": _untag(content)})
    return msgs


_tulu_turns = partial(_split_turns, pattern=r"<\|(system|user|assistant)\|>",
                      roles={r: r for r in ("system", "user", "assistant")})
TEXT_FORMS = {  # the marker a text starts with -> its parser
    "[INST]": _llama2_turns,  # <s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{q} [/INST] {a} </s><s>[INST] {q2} [/INST] ...
    "### Human:": partial(_split_turns, pattern=r"### (Human|Assistant):",  # ### Human: {q}### Assistant: {a}...
                          roles={"Human": "user", "Assistant": "assistant"}),
    "<|im_start|>": _chatml_turns,  # <|im_start|>{role}\n{content}<|im_end|>\n...
    "<|user|>": _tulu_turns, "<|system|>": _tulu_turns,  # <|system|>\n{s}\n<|user|>\n{q}\n<|assistant|>\n{a}</s>\n...
}


# ---------------------------------------------------------------------------------------------------------
# OpenAssistant (OASST1, OASST2): message rows (a flat table) or trees (one per line, replies nested). Both
# become trees of nodes, then one dialog per thread, by OpenAssistant's own SFT export rules (model_training's
# load_oasst_export): a tree counts if its state (when given) is ready_for_export, its prompt passed review
# and its language is wanted; a thread runs from the root prompt to a leaf (a message without replies); a
# deleted or synthetic message anywhere drops it; with top_k, each assistant message needs rank < top_k, or
# no rank and no sibling; a thread ending in a prompter message counts only when that message is its
# parent's first reply, and it is dropped from the dialog. Siblings are ordered by rank, unranked last, then
# file order (the order OpenAssistant's tree export writes).

OASST_ROLES = {"prompter": "user", "assistant": "assistant"}


def _oasst_node(row: dict, where: str, required: tuple[str, ...], ident: str = "") -> dict:
    """The fields the rules and the dialog need, checked; `ident` names the message in errors."""
    what = f"OpenAssistant message {row.get('message_id') or ident}".rstrip()
    for field in required:
        if row.get(field) is None:
            raise DataError(f"{where}: {what} has no {field!r} (found keys {sorted(row)})")
    if not isinstance(row["role"], str) or row["role"] not in OASST_ROLES:
        raise DataError(f"{where}: {what} has role {_short(row['role'])}; expected prompter or assistant")
    if not isinstance(row["text"], str):
        raise DataError(f"{where}: {what}: 'text' is {type(row['text']).__name__}, not a string")
    rank = row.get("rank")
    if isinstance(rank, float) and math.isnan(rank):  # a null rank after a trip through pandas
        rank = None
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, (int, float))):
        raise DataError(f"{where}: {what}: rank {_short(rank)} is not a number")
    return {"id": row["message_id"], "role": row["role"], "text": row["text"], "lang": row.get("lang"),
            "rank": rank, "dropped": bool(row.get("deleted")) or bool(row.get("synthetic")),
            "review_result": row.get("review_result"), "where": where, "replies": []}


def oasst_tree_node(row: dict, where: str) -> dict:
    """A tree row ({"message_tree_id", "tree_state", "prompt": {..., "replies": [...]}}) -> its root node."""
    if not isinstance(row.get("prompt"), dict):
        raise DataError(f"{where}: OpenAssistant tree {_short(row.get('message_tree_id'))} has no prompt message")
    nodes = []
    todo = [(row["prompt"], "prompt", None)]  # (message, path, parent node), depth first in file order; path:
    while todo:  # "prompt.0.2" = the prompt's first reply's third reply. A loop: threads may be any length.
        m, path, parent = todo.pop()
        if not isinstance(m, dict):
            raise DataError(f"{where}: OpenAssistant message {path} is {type(m).__name__}, not an object")
        n = _oasst_node(m, where, ("message_id", "role", "text"), ident=path)
        replies = m.get("replies") or []
        if not isinstance(replies, list):
            raise DataError(f"{where}: OpenAssistant message {n['id']}: 'replies' must be a list")
        todo.extend((r, f"{path}.{i}", n) for i, r in reversed(list(enumerate(replies))))
        if parent is not None:
            parent["replies"].append(n)
        nodes.append(n)
    for n in nodes:
        n["replies"] = _rank_order(n["replies"])
    root = nodes[0]
    root["tree_id"], root["tree_state"] = str(row["message_tree_id"]), row.get("tree_state")
    return root


def add_oasst_message(nodes: dict[str, dict], row: dict, where: str) -> None:
    """Keeps one message row (its needed fields) for linking into trees later."""
    n = _oasst_node(row, where, ("message_id", "message_tree_id", "role", "text"))
    for field in ("message_id", "parent_id"):  # they are looked up: no list or object
        v = row.get(field)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (str, int))):
            raise DataError(f"{where}: OpenAssistant message {n['id']}: {field!r} must be a string or an "
                            f"integer, got {type(v).__name__}")
    if n["id"] in nodes:
        raise DataError(f"{where}: OpenAssistant message {n['id']} appears twice (also at {nodes[n['id']]['where']})")
    n.update(parent_id=row.get("parent_id"), tree_id=str(row["message_tree_id"]), tree_state=row.get("tree_state"))
    nodes[n["id"]] = n


def link_oasst_messages(nodes: dict[str, dict], skip: bool = False) -> tuple[list[dict], list[dict]]:
    """Message rows -> (tree roots in order of each tree's first row, skipped records). Only a tree's root prompt
    lacks a parent_id (the JSON export leaves null fields out; the parquet has nulls). A broken link is a
    DataError; with `skip`, that message and its replies are left out instead, each a skipped record (see
    read_dialogs)."""
    roots: dict[str, dict | None] = {}
    left_out: dict[str, dict] = {}  # message id -> its skipped record

    def leave_out(n: dict, problem: str) -> None:
        left_out[n["id"]] = _bad(DataError(f"{n['where']}: OpenAssistant message {n['id']}{problem}"), n["where"],
                                 "invalid_oasst", skip)

    for n in nodes.values():
        roots.setdefault(n["tree_id"], None)
        if n["parent_id"] is None:
            if roots[n["tree_id"]] is not None:
                leave_out(n, f" has no 'parent_id', but only a tree's root prompt may lack one and tree {n['tree_id']} "
                             f"already has its root at {roots[n['tree_id']]['where']}")
            else:
                roots[n["tree_id"]] = n
        elif n["parent_id"] not in nodes:
            leave_out(n, f": its parent {n['parent_id']} is not in the data")
        else:
            parent = nodes[n["parent_id"]]
            if parent["tree_id"] != n["tree_id"]:
                leave_out(n, f" is in tree {n['tree_id']} but its parent {parent['id']} is in tree {parent['tree_id']}")
            else:
                parent["replies"].append(n)
    for tree_id, root in roots.items():
        if root is None:  # every row of the tree goes (only with skip: otherwise the first one is raised)
            for n in (n for n in nodes.values() if n["tree_id"] == tree_id and n["id"] not in left_out):
                left_out[n["id"]] = _bad(DataError(
                    f"{n['where']}: OpenAssistant tree {tree_id} has no root message (one without 'parent_id'): its "
                    "rows lack 'parent_id' or the parent links form a loop"), n["where"], "invalid_oasst", skip)
    todo = [(r, n) for n in nodes.values() if n["id"] in left_out for r in n["replies"]]
    while todo:  # the replies of a message left out go with it
        r, parent = todo.pop()
        if r["id"] not in left_out:
            leave_out(r, f" replies to {parent['id']}, which was left out")
            todo.extend((rr, r) for rr in r["replies"])
    for n in nodes.values():
        n["replies"] = _rank_order(n["replies"])
    return [r for r in roots.values() if r is not None], list(left_out.values())


def _rank_order(replies: list[dict]) -> list[dict]:
    return sorted(replies, key=lambda r: (r["rank"] is None, r["rank"] or 0))  # stable: ties keep file order


def oasst_dialogs(root: dict, top_k: int = 0, langs: Sequence[str] | None = None, template: str | None = None,
                  skip: bool = False) -> Iterator[dict]:
    """The dialogs of one tree (see the rules above), depth first; `template` and `skip` as in read_dialogs (a
    thread that breaks the rules is a bad row of its last message)."""
    exported = root["tree_state"] in (None, "ready_for_export") and root["review_result"]
    if not exported or (langs and root["lang"] not in langs):  # langs None or empty: every language
        return
    if root["role"] != "prompter":
        yield _bad(DataError(f"{root['where']}: OpenAssistant tree {root['tree_id']} starts with an {root['role']} "
                             "message; expected a prompter message"), root["where"], "invalid_oasst", skip)
        return
    path, todo = [], [(root, 0)]  # the thread from the root to the message visited; messages to visit, their depth
    while todo:
        m, depth = todo.pop()
        del path[depth:]
        path.append(m)
        if m["replies"]:
            todo.extend((r, depth + 1) for r in reversed(m["replies"]))
            continue
        if len(path) < 2 or not _keep_thread(path, top_k):
            continue
        thread = path[:-1] if m["role"] == "prompter" else list(path)
        where = f"{thread[-1]['where']} (message {thread[-1]['id']})"
        try:
            for i, t in enumerate(thread):
                if t["role"] != ("prompter", "assistant")[i % 2]:
                    raise DataError(f"{t['where']}: OpenAssistant message {t['id']} is a {t['role']} message "
                                    f"replying to a {thread[i - 1]['role']} message; roles must alternate")
            msgs = [{"role": OASST_ROLES[t["role"]], "content": t["text"]} for t in thread]
            check_dialog(msgs, where, template)
        except DataError as e:
            yield _bad(e, thread[-1]["where"], "invalid_oasst", skip)
            continue
        yield {"where": where, "group": root["tree_id"], "messages": msgs}


def _keep_thread(thread: list[dict], top_k: int) -> bool:
    if any(m["dropped"] for m in thread):
        return False
    if thread[-1]["role"] == "prompter" and thread[-2]["replies"][0] is not thread[-1]:
        return False
    if top_k:
        for parent, m in zip(thread, thread[1:]):  # an assistant message: rank < top_k, or no rank and no sibling
            ranked_in = len(parent["replies"]) == 1 if m["rank"] is None else m["rank"] < top_k
            if m["role"] == "assistant" and not ranked_in:
                return False
    return True
