"""Training data files -> dialogs.

Containers: `.jsonl` (one object per line), `.json` (an array of objects, or one object per line), their
`.gz` forms, `.parquet` (through pyarrow, the optional `[data]` extra), and a folder of such files (its data
files in sorted name order, not its subfolders). Rows are streamed: no file is ever held as one string.

Formats, detected per file from its first row (every row of a file must have the same one):

  chat      {"messages": [{"role", "content"}, ...]}; other keys (Tulu 2's "dataset", "id") are ignored
  sharegpt  {"conversations": [{"from": "human"|"gpt"|"system"|..., "value"}, ...]}
  alpaca    {"instruction", "input", "output"}: the input rides on the user message as "input"

Every dialog is checked by `llama.chat.validate_dialog`; a bad row is a DataError naming `file:row` (the
line of a .jsonl, the 1-based index of the row in a .json array or a parquet file).
"""
import gzip
import io
import json
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from .chat import validate_dialog

DATA_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class DataError(ValueError):
    """Bad user data; the message names the file and the row."""


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
        hint = ""
        sub = [d.name for d in sorted(path.iterdir()) if d.is_dir() and any(map(is_data_file, d.iterdir()))]
        if sub:
            hint = f"; its subfolder {sub[0]}/ has some: pass {path / sub[0]}"
        raise DataError(f"{path}: the folder holds no data files (expected {', '.join(DATA_SUFFIXES)}){hint}")
    return files


# ---------------------------------------------------------------------------------------------------------
# Containers -> rows.


def iter_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """(row number from 1, row) of one data file; a .jsonl row's number is its line."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    name = path.name.lower()
    if name.endswith(".parquet"):
        yield from _parquet_rows(path)
        return
    n = 0
    try:
        with (gzip.open(path, "rb") if name.endswith(".gz") else open(path, "rb")) as f:
            head = f.read(4096)
            start = head.lstrip()[:1]
            f.seek(0)
            if start == b"[":
                for n, row in _json_array_rows(path, f):
                    yield n, row
                return
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield n, json.loads(line.decode("utf-8"))
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}:{n}: not UTF-8 text ({e.reason} at byte {e.start} of the line)")
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno}); "
                                    "expected one JSON object per line")
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}:{n + 1}: cannot read the file: {e}") from None


def _json_array_rows(path: Path, f) -> Iterator[tuple[int, object]]:
    """Rows of a JSON array, decoded one element at a time from a growing text buffer."""
    text = io.TextIOWrapper(f, encoding="utf-8")
    decoder = json.JSONDecoder()
    buf, pos, n, eof, chunk = "", 0, 0, False, 1 << 20

    def more() -> bool:
        nonlocal buf, pos, eof
        if eof:
            return False
        try:
            got = text.read(max(chunk, len(buf) - pos))  # doubling: an element larger than a chunk costs O(size)
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{n + 1}: not UTF-8 text ({e.reason})") from None
        buf, pos, eof = buf[pos:] + got, 0, not got
        return bool(got)

    def skip_space() -> None:
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf) or not more():
                return

    skip_space()
    assert buf[pos] == "["
    pos += 1
    while True:
        skip_space()
        if pos >= len(buf):
            raise DataError(f"{path}:{n + 1}: not valid JSON (the array is not closed)")
        if buf[pos] == "]":
            return
        if n:
            if buf[pos] != ",":
                raise DataError(f"{path}:{n + 1}: not valid JSON (expected ',' or ']' after row {n})")
            pos += 1
            skip_space()
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
        n += 1
        pos = end
        yield n, row


def _parquet_rows(path: Path) -> Iterator[tuple[int, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet files needs pyarrow: pip install pyarrow "
                        "(or this project's [data] extra)") from None
    n = 0
    try:
        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                n += 1
                yield n, row
    except (OSError, ValueError) as e:  # pyarrow.ArrowInvalid is a ValueError, ArrowIOError an OSError
        raise DataError(f"{path}:{n + 1}: cannot read the parquet file: {e}") from None


# ---------------------------------------------------------------------------------------------------------
# Rows -> dialogs.


def row_format(row, where: str) -> str:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        return "chat"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    raise DataError(f"{where}: row has no recognisable format; expected {{\"messages\": [...]}}, "
                    "Alpaca {\"instruction\", \"input\", \"output\"} or ShareGPT {\"conversations\": [...]}; "
                    f"found keys {sorted(row)}")


def to_messages(row: dict, fmt: str, where: str) -> list[dict]:
    """One row of a row-per-dialog format -> checked [{"role", "content"}, ...]."""
    if fmt == "chat":
        msgs = row["messages"]
    elif fmt == "sharegpt":
        msgs = []
        for turn in row["conversations"] if isinstance(row["conversations"], list) else [None]:
            if not isinstance(turn, dict) or turn.get("from") not in SHAREGPT_ROLES:
                raise DataError(f"{where}: ShareGPT turn {turn!r} has no known 'from' "
                                f"(expected one of {sorted(SHAREGPT_ROLES)})")
            msgs.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn.get("value")})
    elif fmt == "alpaca":  # the input, when present, follows the instruction
        user = {"role": "user", "content": row["instruction"]}
        if row.get("input"):
            user["input"] = row["input"]
        msgs = [user, {"role": "assistant", "content": row["output"]}]
    else:
        raise AssertionError(fmt)
    check_dialog(msgs, where)
    return msgs


def check_dialog(msgs, where: str) -> None:
    try:
        validate_dialog(msgs)
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None


def read_dialogs(path: Path, *, oasst_top_k: int = 0, oasst_lang: Sequence[str] | None = None,
                 text_as_lm: bool = False) -> Iterator[dict]:
    """Samples of a file or folder, in file order then row order:
    {"where": "file:row", "group": str, "messages": [...]} (or "text" for plain language modelling rows).
    "group" is the unit a train/val split draws by (the OASST tree; otherwise the row)."""
    for file in data_files(Path(path)):
        fmt = None
        for n, row in iter_rows(file):
            where = f"{file}:{n}"
            f = row_format(row, where)
            if fmt is None:
                fmt, first = f, n
            elif f != fmt:
                raise DataError(f"{where}: row is {f} but the file's first row ({file}:{first}) is {fmt}; "
                                "every row of a file must have the same format")
            yield {"where": where, "group": where, "messages": to_messages(row, fmt, where)}
