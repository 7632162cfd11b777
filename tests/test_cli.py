"""train.py's command line: the demo as defaults under the given flags, half-given runs refused, repeated --data,
--help by topic, one-line errors, a prepared folder's own settings, the data table; and the README's quick start
and "after the demo" commands, run as written (slow)."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

import train

ROOT = train.ROOT
DIALOG = {"messages": [{"role": "user", "content": "What is the opposite of hot?"},
                       {"role": "assistant", "content": "It is cold."}]}


def test_flags_without_ckpt_and_data_go_on_top_of_the_demo():
    cfg, _ = train.parse_args(["--merge"])
    # the demo's recipe (README, demo/): QLoRA, rows of 256, batch 8, lr 2e-3, 16 epochs, no LoRA dropout, out/demo
    assert (cfg.merge, cfg.quant, cfg.seq_len, cfg.batch_size, cfg.grad_accum, cfg.lr, cfg.epochs,
            cfg.lora_dropout, cfg.out, cfg.overwrite) == (True, "nf4", 256, 8, 1, 2e-3, 16, 0, "out/demo", True)
    assert cfg.ckpt == str(ROOT / "demo" / "tiny-llama") and cfg.data == [str(ROOT / "demo" / "data" / "train.jsonl")]
    assert cfg.gen_eval == str(ROOT / "demo" / "data" / "heldout.jsonl")
    cfg, _ = train.parse_args(["--merge", "--lr", "1e-3", "--out", "elsewhere"])  # the given flags win
    assert (cfg.merge, cfg.lr, cfg.out, cfg.epochs, cfg.quant) == (True, 1e-3, "elsewhere", 16, "nf4")
    cfg, _ = train.parse_args(["--ckpt", "m", "--data", "d.jsonl"])  # not the demo: the recipe's defaults
    assert (cfg.lr, cfg.epochs, cfg.seq_len, cfg.out, cfg.quant, cfg.gen_eval) == (2e-4, 1, 1024, "out/run", "auto", "")


def test_repeated_data_adds_up():
    cfg, _ = train.parse_args(["--ckpt", "m", "--data", "a.json", "--data", "b.jsonl", "c.json.gz:0.5"])
    assert cfg.data == ["a.json", "b.jsonl", "c.json.gz:0.5"]
    cfg, _ = train.parse_args(["--ckpt", "m", "--data=a.json", "--data", "b.jsonl"])
    assert cfg.data == ["a.json", "b.jsonl"]


@pytest.mark.parametrize("argv, want", [
    (["--max-step", "5"], "error: unrecognized argument --max-step; did you mean --max-steps?\n"),
    (["--ckpt", "m", "--data", "d.jsonl", "--seqlen=64"],
     "error: unrecognized argument --seqlen; did you mean --seq-len?\n"),
    (["--lr", "1e-3", "5"], "error: unrecognized argument 5\n"),
    (["--ckpt", "llama-2-7b"], "error: --ckpt given without --data: name the data to fine-tune on (--data FILE ...); "
                               "with neither, `python train.py` runs the demo\n"),
    (["--data", "chats.jsonl", "--lr", "1e-4"], "error: --data given without --ckpt: name the model to fine-tune "
     "(--ckpt FOLDER or org/name); with neither, `python train.py` runs the demo\n"),
    (["--chat", "--temperature", "-1"], "error: --temperature must be 0 (greedy) or more, got -1.0\n"),
    (["--quant", "nf5"], "error: argument --quant: invalid choice: 'nf5'"),  # argparse's words from here on
    (["--lr", "fast"], "error: argument --lr: invalid float value: 'fast'"),
])
def test_command_line_mistakes_are_one_line(argv, want, capsys):
    """Exit 2 with one `error:` line and nothing else (no usage block; --help has it)."""
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    cap = capsys.readouterr()
    assert e.value.code == 2 and cap.out == ""
    assert cap.err.startswith(want) and cap.err.count("\n") == 1, cap.err


def test_help_describes_every_flag_by_topic(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    sections = {}  # title -> its option lines (argparse separates groups by a blank line)
    for chunk in text.split("\n\n"):
        title, _, body = chunk.partition("\n")
        if title.endswith(":") and not title.startswith(" "):
            sections[title[:-1]] = body
    where = {"data": "--data --template --seq-len --no-packing --bad-rows --prepare-data",
             "model": "--ckpt --dtype --device --grad-checkpointing",
             "LoRA and quantization": "--quant --full --lora-r --lora-alpha --rslora --init-adapter",
             "optimization": "--batch-size --grad-accum --epochs --max-steps --lr --optim --seed",
             "run and output": "--out --overwrite --resume --eval-every --save-every --gen-eval",
             "merge and chat": "--merge --merge-layout --chat --adapter",
             "generation and chat": "--system --max-new-tokens --temperature --top-p --no-history"}
    assert list(sections) == ["options", *where]
    for title, flags in where.items():
        for f in flags.split():
            assert re.search(rf"^  {f}\b", sections[title], re.M), (title, f)
    actions = train.make_parser()._actions
    assert len(actions) > 60 and all(a.help for a in actions), [a.dest for a in actions if not a.help]


def test_a_prepared_folder_brings_its_template_and_seq_len(tmp_path, tiny_train_ckpt, capsys):
    """--prepare-data's closing hint is a complete command: the folder brings the --template and --seq-len it was
    prepared with, and ones given on the command line are checked against it, not replaced."""
    prep, folder = tmp_path / "prep", tmp_path / "prep" / "data"
    assert train.main(["--prepare-data", "--ckpt", str(tiny_train_ckpt), "--data", str(tiny_train_ckpt / "data.jsonl"),
                       "--template", "alpaca", "--seq-len", "64", "--out", str(prep), "--data-workers", "1"]) == 0
    hint = capsys.readouterr().out.splitlines()[-1]
    assert hint == (f"data prepared in {folder}; train with the same flags and --out {prep} (it is reused), or with "
                    f"--ckpt {tiny_train_ckpt} --data {folder} (it brings its --template and --seq-len)")
    run = ["--ckpt", str(tiny_train_ckpt), "--data", str(folder), "--max-steps", "1", "--batch-size", "2",
           "--grad-accum", "1", "--quant", "none"]
    assert train.main(run + ["--out", str(tmp_path / "run")]) == 0
    cfg = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert (cfg["template"], cfg["seq_len"]) == ("alpaca", 64)
    capsys.readouterr()
    assert train.main(run + ["--out", str(tmp_path / "run2"), "--template", "llama2"]) == 2
    assert "was rendered with --template alpaca; pass --template alpaca" in capsys.readouterr().err


def test_data_table_lists_every_file_and_counts_in_words(tmp_path, capsys):
    """Each --data file has its row (a long path keeps its end, after "..."); one row is "1 row"."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copy(ROOT / "demo" / "tiny-llama" / "tokenizer.model", ckpt)
    data = tmp_path / "a-folder-with-a-name-long-enough-to-be-cut-in-the-table"
    data.mkdir()
    (data / "a.jsonl").write_text(json.dumps(DIALOG) + "\n")
    (data / "b.json").write_text(json.dumps([DIALOG]))
    assert train.main(["--prepare-data", "--ckpt", str(ckpt), "--data", str(data / "a.jsonl"), "--data",
                       str(data / "b.json"), "--out", str(tmp_path / "o"), "--seq-len", "128"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name in ("a.jsonl", "b.json"):  # the cell: "..." + the path's last 37 characters; then rows (width 7): 1
        cell = "..." + str(data / name)[-37:]
        assert any(ln.startswith(cell + " " * 7 + "1 ") for ln in lines), (cell, lines)
    assert any(ln.startswith("total" + " " * 42 + "2 ") for ln in lines), lines
    assert any(ln.startswith("packed into 1 row; ") for ln in lines), lines


# ---- the README, as written


def readme_commands() -> list[str]:
    """The commands of the README's Quick start section (its ```bash blocks, split at `&&`), without the venv and pip
    setup and the test-suite command."""
    section = (ROOT / "README.md").read_text().split("\n## Quick start\n")[1].split("\n## ")[0]
    commands = [c.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)
                for line in block.splitlines() for c in line.split("&&")]
    return [c for c in commands if c and not c.startswith(("python3 -m venv", ". ", "pip ", "python -m pytest"))]


@pytest.mark.slow
def test_readme_quick_start_and_after_the_demo_commands(tmp_path):
    """Each command as the README writes it, in a folder holding the repository's train.py and demo/ (so out/demo is
    written there): the demo learns, and the adapter (through train.py --chat) and the merged model (through
    llama.generate) hold a two-question conversation."""
    commands = readme_commands()
    assert commands[0] == "python train.py" and any("--chat" in c for c in commands), commands
    assert any(c.startswith("python -m llama.generate") for c in commands), commands
    readme = (ROOT / "README.md").read_text()
    claimed = re.search(r"exact match: before \d+% -> after \d+%", readme)[0]  # the demo's result, as README shows
    for name in ("train.py", "demo"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for command in commands:
        argv = shlex.split(command)
        argv[0] = sys.executable if argv[0] == "python" else argv[0]
        r = subprocess.run(argv, cwd=tmp_path, env=env, input="What is the opposite of hot?\n"
                           "What is the opposite of happy?\n", capture_output=True, text=True, timeout=1200)
        print(f"$ {command}\n{r.stdout}{r.stderr}")  # shown when the test fails (or with -s)
        assert r.returncode == 0, (command, r.stderr[-2000:])
        if argv[1] == "train.py" and "--chat" not in argv:
            assert claimed in r.stdout, (command, claimed, r.stdout[-1500:])
        if "--merge" in argv:
            assert (tmp_path / "out" / "demo" / "merged" / "config.json").is_file()
        if "--chat" in argv or "llama.generate" in argv:  # interactive: both questions answered, in turn
            assert "> It is cold.\n> It is sad.\n" in r.stdout, (command, r.stdout)
