"""What a run prints: a short summary instead of the config JSON, and no bitsandbytes warning about a kernel we
do not use (while its other messages still come through)."""
import inspect
import json
import logging
import re
import subprocess
import sys

import pytest

import quant  # noqa: F401  (installs the filter, as train.py's import does)
import train
from llama import Tokenizer

ROOT = train.ROOT


def test_run_prints_a_short_summary_and_saves_the_full_config(tiny_train_ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    assert train.main(["--ckpt", str(tiny_train_ckpt), "--data", str(tiny_train_ckpt / "data.jsonl"), "--out", str(out),
                       "--quant", "nf4", "--max-steps", "2", "--seq-len", "64", "--batch-size", "2", "--grad-accum", "1"]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert not any(ln.startswith("config:") for ln in lines)
    assert max(len(ln) for ln in lines) < 200  # paths included; the config line was 1,000 characters
    summary = {ln.split(":")[0].strip(): ln for ln in lines if re.match(r"run: |  (model|data|steps|output): ", ln)}
    assert summary["run"] == ("run: QLoRA: NF4 base + LoRA r 16, alpha 32, dropout 0.05 on wq, wk, wv, wo, w1, w2, w3; "
                              "fp32 on cpu (--dtype auto: this CPU has no native bf16, neither AVX512-BF16 nor AMX)")
    # tiny_train_ckpt: dim 64, 2 layers, 4 heads (head dim 16), 2 kv heads, FFN hidden = 16 * ceil(2/3 * 256 / 16)
    dim, layers, kv_dim, hidden, vocab = 64, 2, 2 * 16, 176, Tokenizer(str(train.DEMO / "tiny-llama" / "tokenizer.model")).n_words
    n = 2 * vocab * dim + layers * (2 * dim * dim + 2 * dim * kv_dim + 3 * dim * hidden + 2 * dim) + dim
    assert summary["model"].startswith(f"  model:  {tiny_train_ckpt} (Meta layout, {n / 1e3:.1f}K parameters: 2 layers, dim 64")
    n_lora = layers * 16 * (2 * (dim + dim) + 2 * (dim + kv_dim) + 3 * (dim + hidden))  # r (in + out) per target
    assert f"  trainable params: {n_lora:,} of {n + n_lora:,} ({100 * n_lora / (n + n_lora):.3f}%)" in lines
    stats = json.loads((out / "data_stats.json").read_text())
    assert summary["data"] == (f"  data:   20 samples, {stats['total']['tokens']:,} tokens -> {stats['rows']} rows of 64 "
                               "tokens (packed)")  # the fixture writes 20 chats
    spe = -(-stats["rows"] // 2)  # steps per epoch: rows / (batch 2 x accumulation 1), rounded up
    assert summary["steps"] == f"  steps:  2 ({2 / spe:.3g} epochs of {spe} steps x 2 rows), lr 0.0002 cosine"
    assert summary["output"] == f"  output: {out} (full config in {out / 'run_config.json'})"
    cfg = json.loads((out / "run_config.json").read_text())
    assert set(cfg) == {f.name for f in train.dataclasses.fields(train.TrainConfig)} and cfg["max_steps"] == 2
    # the adapter names its base, so `python -m llama.generate --ckpt OUT/adapter` can say what to run instead
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tiny_train_ckpt)


def bnb_kernel_warning_format() -> str:
    """The exact format string bitsandbytes logs, read from its source (this test fails if its wording changes)."""
    from bitsandbytes.backends.cpu import ops
    found = re.findall(r'"(Failed to load CPU gemm_4bit_forward[^"]*)"', inspect.getsource(ops))
    assert len(found) == 1, found
    return found[0]


def test_filter_drops_only_the_kernel_warning(caplog):
    from bitsandbytes.backends.cpu import ops
    assert ops.logger is logging.getLogger(quant.BNB_CPU_LOGGER)
    caplog.set_level(logging.WARNING)
    ops.logger.warning(bnb_kernel_warning_format(), ModuleNotFoundError("No module named 'kernels'"))
    ops.logger.warning("Failed to load the CPU library")          # another warning from the same logger
    ops.logger.error("gemv_4bit: unsupported dtype")                # and an error
    logging.getLogger("bitsandbytes.cextension").warning("the native library could not be loaded")
    assert [r.getMessage() for r in caplog.records] == [
        "Failed to load the CPU library", "gemv_4bit: unsupported dtype", "the native library could not be loaded"]


QUIET_IMPORT = """
import logging, sys
seen = []
def record(r):  # runs before quant's filter: sees what bitsandbytes logs, dropped or not
    seen.append(r.getMessage())
    return True
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(record)
import quant
import bitsandbytes.functional
print(repr(seen))
"""


def test_importing_bitsandbytes_through_quant_is_quiet():
    """In a fresh process that imports bitsandbytes through quant (as train.py does): the kernel warning is
    logged by bitsandbytes (on CPUs where it tries that kernel) and does not reach stderr."""
    r = subprocess.run([sys.executable, "-c", QUIET_IMPORT], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    seen = eval(r.stdout)
    if not seen:
        pytest.skip("bitsandbytes does not try the kernels-community CPU kernel here (no AVX512-BF16, or the "
                    "`kernels` package is installed)")
    assert len(seen) == 1 and seen[0].startswith(quant.BNB_KERNEL_WARNING)
    assert "gemm_4bit_forward" not in r.stderr, r.stderr
