"""Two CPU processes (torchrun, gloo) train exactly like one process on the same global batch.

LoRA: replicated base, all-reduced adapter gradients. Full fine-tuning: FSDP2, every block sharded.
"""
import json
import os
import subprocess
import sys

import pytest

import train

pytestmark = pytest.mark.slow  # end-to-end: subprocesses / whole training steps


@pytest.fixture
def ckpt(tiny_train_ckpt):
    return tiny_train_ckpt


def run(ckpt, out, nproc, batch, accum, *extra):
    args = ["train.py", "--ckpt", str(ckpt), "--data", str(ckpt / "data.jsonl"), "--out", str(out), "--seq-len", "32",
            "--batch-size", str(batch), "--grad-accum", str(accum), "--max-steps", "4", "--lr", "3e-3",
            "--lora-dropout", "0", "--warmup-ratio", "0", "--quant", "none", *extra]
    cmd = [sys.executable, *(["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                             if nproc > 1 else []), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=train.ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    trainable = next(line for line in r.stdout.splitlines() if "trainable params" in line)
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()], trainable


@pytest.mark.parametrize("mode", [[], ["--full"]], ids=["lora", "full-fsdp"])
def test_two_processes_match_one(tmp_path, ckpt, mode):
    one, one_params = run(ckpt, tmp_path / "one", 1, 2, 2, *mode)
    two, two_params = run(ckpt, tmp_path / "two", 2, 2, 1, *mode)  # same global batch: 2 ranks x 2 rows
    assert one_params == two_params  # the whole model's counts, however it is sharded
    assert len(one) == len(two) == 4
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-5, (one, two)
    assert one[-1] < one[0]


def test_fsdp_checkpoint_is_whole_and_resumes_exactly(tmp_path, ckpt):
    """FSDP: every rank writes its shard into rank 0's temporary folder, which then appears whole as
    checkpoint-STEP; a run resumed from it logs the losses of the uninterrupted run."""
    steps = ["--full", "--schedule", "constant"]
    ref, _ = run(ckpt, tmp_path / "ref", 2, 2, 1, *steps)
    out = tmp_path / "resumed"
    run(ckpt, out, 2, 2, 1, *steps, "--max-steps", "2", "--save-every", "2")
    assert sorted(p.name for p in (out / "checkpoint-2").iterdir()) == ["dcp", "rng-rank0.pt", "rng-rank1.pt", "state.pt"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary folder left
    resumed, _ = run(ckpt, out, 2, 2, 1, *steps, "--resume")
    assert resumed == ref
