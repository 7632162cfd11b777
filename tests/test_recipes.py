"""The README's recipes run as written: each command of its "Recipes" block, with `--ckpt` pointed at a tiny
checkpoint and `--prepare-data` added (the data path only: no model is loaded), on small files that carry the
published datasets' exact names and schemas. The recipe text is read from README.md, so a recipe edited there
is the recipe tested."""
import gzip
import json
import re
import shlex
from glob import glob
from pathlib import Path

import pytest

import train
from test_data_formats import OASST_ROWS, TULU_ROWS, oasst_trees, write_jsonl

pa = pytest.importorskip("pyarrow", reason="pyarrow (the [data] extra) is not installed")
pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow (the [data] extra) is not installed")

README = Path(train.ROOT) / "README.md"
GUANACO = ["### Human: What is the opposite of hot?### Assistant: Cold.",
           "### Human: Name a colour.### Assistant: Blue.### Human: Another?### Assistant: Red."]
INST = ["<s>[INST] What is the opposite of up? [/INST] Down. </s>",
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHot? [/INST] Cold. </s><s>[INST] Big? [/INST] Small. </s>"]
ALPACA = [{"instruction": "Give the opposite.", "input": "hot", "output": "cold"},
          {"instruction": "Name a colour.", "input": "", "output": "Blue."}]


def recipe_commands() -> list[list[str]]:
    block = README.read_text().split("### Recipes", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = []
    for cmd in re.sub(r"\\\n\s*", " ", block).splitlines():
        cmd = cmd.strip()
        if cmd and not cmd.startswith("#"):
            commands.append(shlex.split(cmd))
    return commands


def write_published_files(root: Path) -> None:
    """Tiny files under the names the recipes use, in the published schemas."""
    write_jsonl(root / "openassistant_best_replies_train.jsonl", [{"text": t} for t in GUANACO])
    (root / "alpaca_data.json").write_text(json.dumps(ALPACA, indent=4))
    (root / "tulu-v2-sft-mixture" / "data").mkdir(parents=True)
    for k in range(3):  # three shards, as the hub has them
        pq.write_table(pa.Table.from_pylist(TULU_ROWS[k:k + 1]),
                       root / "tulu-v2-sft-mixture" / "data" / f"train-0000{k}-of-00003-{k}f0e.parquet")
    (root / "oasst1" / "data").mkdir(parents=True)
    rows = [{**r, "parent_id": r.get("parent_id"), "rank": r.get("rank"), "emojis": None, "labels": None}
            for r in OASST_ROWS]
    pq.write_table(pa.Table.from_pylist(rows), root / "oasst1" / "data" / "train-00000-of-00001-b42a775f407cee45.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:3]),  # the hub's validation split sits beside it
                   root / "oasst1" / "data" / "validation-00000-of-00001-134b8fd0c89408b6.parquet")
    write_jsonl(root / "2023-04-12_oasst_ready.trees.jsonl.gz", oasst_trees(OASST_ROWS), gzip.open)
    (root / "guanaco-llama2-1k" / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"text": t} for t in INST]),
                   root / "guanaco-llama2-1k" / "data" / "train-00000-of-00001-9ad84bb9cf65a42f.parquet")


@pytest.mark.slow
def test_readme_recipes_prepare_their_published_files(tmp_path, tiny_train_ckpt, monkeypatch):
    commands = recipe_commands()
    assert len(commands) >= 6, commands
    write_published_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    for argv in commands:
        argv = argv[argv.index("train.py") + 1:]  # `python train.py ...` or `torchrun ... train.py ...`
        argv = [a for pattern in argv for a in (sorted(glob(pattern)) or [pattern])]  # the shell's globbing
        argv[argv.index("--ckpt") + 1] = str(tiny_train_ckpt)
        assert train.main(argv + ["--prepare-data", "--data-workers", "1"]) == 0, argv
        out = Path(argv[argv.index("--out") + 1])
        stats = json.loads((out / "data_stats.json").read_text())
        assert stats["total"]["accepted"] > 0 and not stats["total"]["skipped"], (argv, stats)
        if "--oasst-top-k" in argv:  # top-1 over the 20 languages: threads T1, T6, T7 of the fixture (fr fails review)
            assert stats["total"]["accepted"] + stats["total"]["val"] == 3, stats
        if any("oasst1/data/train-" in a for a in argv):  # only the train file: every thread of the fixture
            assert stats["total"]["accepted"] == 7, stats
