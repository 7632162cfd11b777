"""benchmarks/bench_train.py: before it times anything, the benchmark checks that our training step and the
Hugging Face stack's (transformers + peft, + bitsandbytes for QLoRA) compute the same thing. Here: that check
passes for every mode at --size tiny (the reference is transformers/peft/bitsandbytes run by the benchmark
itself), and it stops the run when the two sides differ. No timing is asserted."""
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_train  # noqa: E402

pytestmark = pytest.mark.slow  # end-to-end: subprocesses / whole training steps


FAST = ["--size", "tiny", "--device", "cpu", "--seq-len", "64", "--tokens-per-step", "128", "--reps", "1",
        "--warmup", "0"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):  # the random checkpoint + adapter, made once for both tests
    return str(tmp_path_factory.mktemp("bench_train_work"))


def test_step0_parity_every_mode(work, tmp_path):
    out = tmp_path / "out"
    result = bench_train.main(FAST + ["--work-dir", work, "--out-dir", str(out)])
    rows = {r["mode"]: r for r in result["rows"]}
    assert set(rows) == set(bench_train.MODES)
    for mode, r in rows.items():
        assert "error" not in r, (mode, r.get("error"))
        print(f"{mode}: |loss ours - HF| {r['loss0_diff']:.1e}, gradient error {r['grad_rel_err']:.1e}")
        assert r["loss0_diff"] <= 1e-4, mode
        # at tiny width one double-quant group (256 blocks of 64) covers a whole q/k weight, so HF's row order
        # cannot change its NF4 values and QLoRA must match as tightly as the others
        assert r["grad_rel_err"] <= 1e-3, mode
        assert r["trained_tokens"] > 0 and r["ours_tok_s"] > 0 and r["hf_tok_s"] > 0
        assert r["ours_peak"] > 0 and r["hf_peak"] > 0
    # the LoRA modes train the same adapter on both sides; QLoRA's base is quantized (a different loss)
    assert rows["lora"]["ours_trainable"] == rows["lora"]["hf_trainable"] == rows["qlora"]["hf_trainable"]
    assert rows["lora"]["loss0_ours"] != rows["qlora"]["loss0_ours"]
    saved = json.loads((out / "bench_train_tiny_cpu_fp32.json").read_text())
    assert [r["mode"] for r in saved["rows"]] == [r["mode"] for r in result["rows"]]
    # both processes ran under train.py's process settings (the same allocator for the baseline)
    import train
    want = {k: os.environ.get(k, v) for k, v in train.PROCESS_ENV.items()}
    assert saved["process_env"] == want and set(want) == {"MKL_CBWR", "THP_MEM_ALLOC_ENABLE"}
    for r in saved["rows"]:
        assert r["ours_env"] == r["hf_env"] == want


def test_parity_check_stops_a_different_computation(work, tmp_path):
    # ours with its final norm scaled by 1.001: a different model, which the check must refuse to time
    with pytest.raises(bench_train.ParityError, match="do not compute the same step"):
        bench_train.main(FAST + ["--modes", "lora", "--perturb-ours", "1e-3", "--work-dir", work,
                                 "--out-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out" / "bench_train_tiny_cpu_fp32.json").exists()


def test_step0_parity_in_bf16(tmp_path):
    """--dtype bf16 on CPU (what --dtype auto trains in on a CPU with native bf16): ours as train.py runs it there
    (bf16 weights, no autocast) and HF under bf16 autocast are both judged against HF's fp32 step on the same
    weights (parity.judge: within 2e-2, or no further from it than twice HF's own bf16 step)."""
    out = tmp_path / "out"
    result = bench_train.main(FAST + ["--dtype", "bf16", "--modes", "lora", "qlora", "--work-dir",
                                      str(tmp_path / "work"), "--out-dir", str(out)])
    assert result["dtype"] == "bf16" and [r["mode"] for r in result["rows"]] == ["lora", "qlora"]
    for r in result["rows"]:
        assert "error" not in r, r
        print(f"{r['mode']}: |loss ours - HF| {r['loss0_diff']:.1e}, gradient error {r['grad_rel_err']:.1e}")
        assert r["ours_tok_s"] > 0 and r["hf_tok_s"] > 0
    assert json.loads((out / "bench_train_tiny_cpu_bf16.json").read_text())["dtype"] == "bf16"
