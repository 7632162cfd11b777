"""benchmarks/gpu_suite.py on CPU: argument handling, the no-GPU one-liner, a failing check stopping the suite
before the benchmarks, a stage that runs out of time, and the whole orchestration with `--device cpu --quick`
producing the JSON files and the Markdown summary. Nothing here needs a GPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_suite  # noqa: E402


def test_no_gpu_is_one_line_and_exit_2():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))  # no GPU, even on a GPU machine
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--out", "/nonexistent/x"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2
    assert r.stdout == "" and len(r.stderr.splitlines()) == 1, r.stderr
    assert "no CUDA GPU" in r.stderr and "--device cpu" in r.stderr and "Traceback" not in r.stderr
    assert not Path("/nonexistent/x").exists()


@pytest.mark.parametrize("argv, expect", [
    (["--device", "cpu", "--stages", "nf4,bogus"], "--stages nf4,bogus: expected a comma list of"),
    (["--device", "cpu", "--stages", ","], "--stages : expected"),
    (["--device", "tpu"], "invalid choice: 'tpu'"),
])
def test_bad_arguments_exit_2(argv, expect, capsys):
    with pytest.raises(SystemExit) as e:
        gpu_suite.main(argv)
    assert e.value.code == 2 and expect in capsys.readouterr().err


def test_out_must_be_a_folder(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    with pytest.raises(SystemExit) as e:
        gpu_suite.main(["--device", "cpu", "--out", str(tmp_path / "f")])
    assert e.value.code == 2 and "is a file, not a folder" in capsys.readouterr().err


FAKE_TESTS = '''
import pytest

def test_good():
    assert True

def test_broken_kernel():
    assert 1 + 1 == 3, "the failing case: 1 + 1 is not 3"

@pytest.mark.skip(reason="a reason to skip")
def test_skipped():
    pass
'''


def test_failing_correctness_stops_before_benchmarks(tmp_path, capsys):
    tests = tmp_path / "test_fake.py"
    tests.write_text(FAKE_TESTS)
    out = tmp_path / "out"
    code = gpu_suite.main(["--device", "cpu", "--out", str(out), "--tests", str(tests)])
    printed = capsys.readouterr().out
    assert code == 1
    assert "FAILED" in printed and "test_broken_kernel" in printed and "1 + 1 is not 3" in printed
    suite = json.loads((out / "suite.json").read_text())
    assert list(suite["stages"]) == ["correctness"]  # nf4 and train never started
    assert suite["verdict"].startswith("FAILED: correctness failed, benchmarks not run")
    c = json.loads((out / "correctness.json").read_text())
    assert c["counts"] == {"passed": 1, "failed": 1, "error": 0, "skipped": 1}
    assert [x["test"].split("::")[-1] for x in c["failed"]] == ["test_broken_kernel"]
    assert not list(out.glob("bench_*.json"))
    md = (out / "summary.md").read_text()
    assert "1 passed, 1 failed, 0 errors, 1 skipped" in md and "test_broken_kernel" in md
    assert "skipped 1: a reason to skip" in md and md in printed


def test_a_stage_out_of_time_is_killed_and_reported(tmp_path, monkeypatch, capsys):
    tests = tmp_path / "test_hang.py"
    tests.write_text("import time\n\ndef test_quick():\n    pass\n\ndef test_hangs():\n    time.sleep(600)\n")
    monkeypatch.setitem(gpu_suite.TOTAL, "cpu", 15)
    monkeypatch.setitem(gpu_suite.BUDGET, "cpu", {"correctness": 15, "nf4": 60, "train": 90})
    out = tmp_path / "out"
    code = gpu_suite.main(["--device", "cpu", "--out", str(out), "--tests", str(tests), "--stages", "correctness"])
    assert code == 1
    c = json.loads((out / "correctness.json").read_text())
    assert c["status"] == "timeout" and c["shards"]["tests"]["exit"] is None
    assert "ran out of time" in c["problems"][0] and "test_hangs" in c["problems"][0]  # the test it was running
    assert [(x["test"].split("::")[-1], x["outcome"]) for x in c["cases"]] == [("test_quick", "passed")]
    assert "FAILED: correctness timeout" in capsys.readouterr().out


def test_skips_on_a_gpu_are_not_a_pass():
    suite = {"stages": {"correctness": {"status": "passed", "counts": {"passed": 30, "failed": 0, "error": 0,
                                                                       "skipped": 2}}}}
    gpu = type("Args", (), {"device": "cuda"})
    code, verdict = gpu_suite.verdict(suite, gpu)
    assert code == 1 and verdict.startswith("INCOMPLETE: 2 tests skipped")
    cpu = type("Args", (), {"device": "cpu"})
    assert gpu_suite.verdict(suite, cpu)[0] == 0  # on CPU the cuda tests are expected to skip


def test_cpu_correctness_stage_lists_the_skipped_cuda_tests(tmp_path, capsys):
    out = tmp_path / "out"
    code = gpu_suite.main(["--device", "cpu", "--quick", "--out", str(out), "--stages", "correctness"])
    assert code == 0
    c = json.loads((out / "correctness.json").read_text())
    assert set(c["shards"]) == {"gpu"}  # --quick: no interpreter run of test_triton_nf4.py
    assert c["counts"]["passed"] == c["counts"]["failed"] == c["counts"]["error"] == 0
    skipped = {x["test"].split("::")[-1].split("[")[0] for x in c["skipped"]}
    assert {"test_triton_nf4_at_7b_shapes", "test_packed_flex_attention_equals_documents_alone",
            "test_qlora_bf16_step_matches_transformers_peft_bitsandbytes",
            "test_train_py_qlora_on_gpu_saves_an_adapter_peft_loads"} <= skipped
    assert all("needs a CUDA GPU" in x["message"] for x in c["skipped"])
    md = (out / "summary.md").read_text()
    assert f"skipped {c['counts']['skipped']}: needs a CUDA GPU" in md


@pytest.mark.slow
def test_cpu_quick_run_writes_json_and_summary(tmp_path, capsys):
    out = tmp_path / "out"
    code = gpu_suite.main(["--device", "cpu", "--quick", "--out", str(out)])
    printed = capsys.readouterr().out
    suite = json.loads((out / "suite.json").read_text())
    assert code == 0, suite
    assert [s["status"] for s in suite["stages"].values()] == ["passed"] * 3
    for name in ("correctness", "nf4", "train"):
        assert f"[{name}] passed in" in printed  # elapsed per stage, as it goes
    env = suite["environment"]
    assert env["torch"] and env["triton"] and env["device_name"]
    nf4 = json.loads((out / "bench_nf4_cpu.json").read_text())
    assert nf4["shapes"] == ["tiny"] and [r["M"] for r in nf4["rows"]] == [None, 1, 16]
    assert all(r["ours_triton_ms"] > 0 for r in nf4["rows"] if r["op"] == "matmul")  # the interpreter ran
    train = json.loads((out / "bench_train_tiny_cpu_fp32.json").read_text())
    assert [r["mode"] for r in train["rows"]] == ["qlora"]
    assert all("error" not in r and r["loss0_diff"] <= 1e-4 for r in train["rows"])
    md = (out / "summary.md").read_text()
    assert md in printed and printed.rstrip().endswith(f"results in {out}")
    assert f"torch {env['torch']}" in md and f"triton {env['triton']}" in md
    assert "## NF4 kernels" in md and "| tiny | 256x128 | 1 |" in md
    assert "## Training step" in md and "| 64 | qlora |" in md


@pytest.mark.slow
def test_gpu_shards_cover_every_test_once():
    """The GPU run's pytest shards (-k groups) select every test of their files exactly once."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def collect(args: list[str]) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def ids(p: subprocess.Popen) -> list[str]:
        out = p.communicate(timeout=300)[0]
        return [line for line in out.splitlines() if "::" in line]

    shards = gpu_suite.SHARDS["cuda"]
    files = sorted({a[0] for a in shards.values()})
    procs = {name: collect(a) for name, a in shards.items()} | {"all": collect(files)}
    every = ids(procs.pop("all"))
    selected = [i for p in procs.values() for i in ids(p)]
    assert len(every) > 100 and sorted(selected) == sorted(every)
