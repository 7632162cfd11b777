"""One command that proves the GPU paths: correctness first, then speed, then one Markdown summary.

    python benchmarks/gpu_suite.py [--device cuda|cpu] [--quick] [--out results/gpu] [--stages correctness,nf4,train]

On one CUDA GPU (sm_80+) the default run fits in 8 minutes of wall time, Triton and torch.compile compilation and
the random models built in memory included (nothing is downloaded). Three stages, each in subprocesses with a
timeout; each may use what earlier stages left of their budget (BUDGET), never the later stages' share:

1. correctness: pytest on tests/test_gpu.py (every test marked `cuda`: the Triton NF4 kernels at 7B shapes,
   packed flex_attention, a QLoRA bf16 step against transformers + peft + bitsandbytes, train.py with --quant
   nf4 saving an adapter PEFT loads) and tests/test_triton_nf4.py (compiled on a GPU), as parallel shards
   (SHARDS) because Triton's compilation is CPU-bound. A failing test stops the suite before the benchmarks and its
   case is printed. A test skipped on a GPU is a check that did not run: it is listed and the exit code is 1.
2. nf4: benchmarks/bench_nf4.py --quick: the fused GEMV against bitsandbytes' gemv_4bit at M = 1 and the GEMM
   against cuBLAS bf16 at M = 4096, 7B shapes; GEMV GB/s against the spec-sheet peak (a table by device name)
   and against a device-to-device copy measured in the same run.
3. train: benchmarks/bench_train.py --quick: LoRA and QLoRA steps, ours against transformers + peft (+ bnb),
   tokens/s and torch.cuda.max_memory_allocated, after its step-0 parity gate.

Output in --out: suite.json (environment, stages, verdict), correctness.json (every test's outcome), the
benchmarks' bench_nf4_<device>.json and bench_train_<size>_<device>_<dtype>.json, one log per subprocess, and
summary.md, which is also printed at the end: device, torch / CUDA / Triton versions and every figure.

--device cpu runs the same orchestration on CPU, for CI: CUDA is hidden from the subprocesses, the `cuda` tests
show as skipped, test_triton_nf4.py runs in Triton's interpreter, the benchmarks run at their CPU --quick sizes
(the tiny model, the tiny weight). --quick: smoke sizes anywhere (no test_triton_nf4.py; the tiny model and
weight on a GPU too). Exit codes: 0 everything ran and passed; 1 a check failed, a stage failed or ran out of
time, or a test was skipped on a GPU; 2 bad usage or no usable GPU.
"""
import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
STAGES = ("correctness", "nf4", "train")
# Seconds per stage, planned for one H100/H200-class GPU (cuda) and for a 2-core CI machine (cpu); the total
# leaves room for the suite's own start and summary inside 8 minutes.
BUDGET = {"cuda": {"correctness": 220, "nf4": 70, "train": 170}, "cpu": {"correctness": 150, "nf4": 60, "train": 90}}
TOTAL = {"cuda": 470, "cpu": 310}
# The correctness stage's pytest shards, run side by side. On a GPU, Triton compiles each kernel configuration
# (tile sizes x direction x dtype) on one CPU core and torch.compile builds flex_attention's kernels, so the
# tests are grouped by what they compile; tests/test_gpu_suite.py checks that the groups cover each test once.
SHARDS = {
    "cuda": {
        "nf4-bf16": ["tests/test_gpu.py", "-k", "(triton or dequantize) and not fp16"],
        "nf4-fp16": ["tests/test_gpu.py", "-k", "triton and fp16"],
        "flex": ["tests/test_gpu.py", "-k", "flex"],
        "qlora-step": ["tests/test_gpu.py", "-k", "qlora_bf16_step"],
        "train-py": ["tests/test_gpu.py", "-k", "train_py"],
        "triton-nf4-fp32": ["tests/test_triton_nf4.py", "-k", "dtype0"],
        "triton-nf4-bf16": ["tests/test_triton_nf4.py", "-k", "dtype1"],
        "triton-nf4-rest": ["tests/test_triton_nf4.py", "-k", "not (dtype0 or dtype1)"],
    },
    # CPU: the cuda tests only skip, and the interpreter has nothing to compile
    "cpu": {"gpu": ["tests/test_gpu.py"], "triton-nf4": ["tests/test_triton_nf4.py"]},
}
HEARTBEAT_S = 30


class UsageError(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# Subprocesses with a deadline.


def run_all(jobs: dict[str, list[str]], logs: dict[str, Path], env: dict, timeout: float, stage: str) -> dict:
    """Run the commands side by side (stdout and stderr to their logs) until all exit or `timeout` passes; then
    kill what is left, with its children. Returns {name: exit code, None if killed}."""
    procs = {}
    for name, cmd in jobs.items():
        with open(logs[name], "w") as log:
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            procs[name] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True)  # its own process group, killed as one
    t0 = time.time()
    beat = t0 + HEARTBEAT_S
    try:
        while any(p.poll() is None for p in procs.values()) and time.time() - t0 < timeout:
            time.sleep(0.5)
            if time.time() >= beat:
                beat += HEARTBEAT_S
                running = [n for n, p in procs.items() if p.poll() is None]
                print(f"  {stage}: {time.time() - t0:.0f}s, running {', '.join(running)}; "
                      + "; ".join(f"{n}: {last_line(logs[n])[:100]}" for n in running), flush=True)
    finally:  # out of time, or the suite itself interrupted: nothing of ours keeps running
        codes = {}
        for name, p in procs.items():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
                codes[name] = None
            else:
                codes[name] = p.returncode
    return codes


def last_line(path: Path) -> str:
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()] if path.exists() else []
    return lines[-1].strip() if lines else ""


def tail(path: Path, n: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


def child_env(device: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["PYTHONUNBUFFERED"] = "1"  # the logs show each line as it is written: the heartbeat, a killed shard's last test
    if device == "cpu":  # the CPU run stays on the CPU on a GPU machine too; Triton kernels in the interpreter
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["TRITON_INTERPRET"] = "1"
    return env


# ---------------------------------------------------------------------------------------------
# The stages. Each returns its record: status (passed | failed | timeout | error), and what it found.


def read_junit(xml: Path) -> list[dict]:
    cases = []
    for tc in ET.parse(xml).getroot().iter("testcase"):
        node = tc.get("classname", "").replace(".", "/") + ".py::" + tc.get("name", "")
        outcome, message, text = "passed", "", ""
        for kind in ("failure", "error", "skipped"):
            el = tc.find(kind)
            if el is not None:
                outcome, message, text = {"failure": "failed"}.get(kind, kind), el.get("message", ""), el.text or ""
                break
        cases.append({"test": node, "outcome": outcome, "time_s": float(tc.get("time", 0)), "message": message,
                      "detail": "\n".join(text.splitlines()[-25:]) if outcome in ("failed", "error") else ""})
    return cases


def read_verbose_log(log: Path) -> list[dict]:
    """Outcomes from `pytest -v` lines ("tests/x.py::test_y[id] PASSED   [ 10%]"), for a shard stopped early."""
    cases = []
    for line in log.read_text(errors="replace").splitlines():
        m = re.match(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR)\b", line)
        if m:
            outcome = {"PASSED": "passed", "FAILED": "failed", "SKIPPED": "skipped", "ERROR": "error"}[m.group(2)]
            cases.append({"test": m.group(1), "outcome": outcome, "time_s": 0.0, "message": "", "detail": ""})
    return cases


def stage_correctness(args, out: Path, env: dict, timeout: float) -> dict:
    if args.tests:
        shards = {"tests": args.tests}
    else:
        shards = {k: v for k, v in SHARDS[args.device].items() if not (args.quick and k.startswith("triton-nf4"))}
    jobs, logs, xmls = {}, {}, {}
    for name, paths in shards.items():
        xmls[name], logs[name] = out / f"pytest_{name}.xml", out / f"pytest_{name}.log"
        xmls[name].unlink(missing_ok=True)
        jobs[name] = [sys.executable, "-m", "pytest", "-v", "--tb=short", "-rfEs", "-p", "no:cacheprovider",
                      f"--junitxml={xmls[name]}", *paths]
    codes = run_all(jobs, logs, env, timeout, "correctness")
    cases, problems = [], []
    for name, code in codes.items():
        if code is None:  # no report: what finished is in pytest -v's log
            cases += read_verbose_log(logs[name])
            problems.append(f"shard {name} ran out of time ({timeout:.0f}s); it was running: {last_line(logs[name])}")
        elif not xmls[name].exists():
            problems.append(f"shard {name} exited {code} without a report:\n{tail(logs[name])}")
        else:
            cases += read_junit(xmls[name])
            if code not in (0, 1):  # 1 = some tests failed (listed below); 2..5: interrupted, usage, nothing collected
                problems.append(f"shard {name}: pytest exited {code}:\n{tail(logs[name])}")
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    failed = [c for c in cases if c["outcome"] in ("failed", "error")]
    if not cases and not problems:
        problems.append("no tests ran")
    status = "timeout" if any(c is None for c in codes.values()) else "failed" if failed or problems else "passed"
    return {"status": status, "counts": counts, "failed": failed, "problems": problems,
            "skipped": [c for c in cases if c["outcome"] == "skipped"], "cases": cases,
            "shards": {n: {"cmd": jobs[n], "exit": codes[n], "log": logs[n].name} for n in jobs}}


def newest(out: Path, pattern: str, since: float) -> Path | None:
    found = [p for p in out.glob(pattern) if p.stat().st_mtime >= since - 1]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def stage_bench(name: str, script: str, extra: list[str], pattern: str, args, out: Path, env: dict,
                timeout: float) -> dict:
    cmd = [sys.executable, str(BENCH / script), "--device", args.device, "--quick", "--out-dir", str(out), *extra]
    log = out / f"{name}.log"
    t0 = time.time()
    code = run_all({name: cmd}, {name: log}, env, timeout, name)[name]
    result = newest(out, pattern, t0)
    record = {"cmd": cmd, "exit": code, "log": log.name}
    if code is None:
        return dict(record, status="timeout", problem=f"ran out of time ({timeout:.0f}s); last output: {last_line(log)}")
    if code != 0 or result is None:
        return dict(record, status="error", problem=f"exited {code}" + ("" if result else ", no JSON written")
                    + f":\n{tail(log)}")
    return dict(record, status="passed", json=result.name, result=json.loads(result.read_text()))


def bench_args(args, work: Path) -> dict[str, list[str]]:
    """Extra flags for the benchmarks beyond --quick: smoke sizes on a GPU under --quick."""
    smoke = args.quick and args.device == "cuda"
    nf4 = ["--shapes", "tiny", "--ms", "1,16"] if smoke else []
    train = ["--work-dir", str(work)] + (["--size", "tiny", "--seq-len", "64", "--tokens-per-step", "128", "--reps",
                                          "2", "--warmup", "1"] if smoke else [])
    return {"nf4": nf4, "train": train}


# ---------------------------------------------------------------------------------------------
# Environment and summary.


def version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: str) -> dict:
    import torch
    sys.path.insert(0, str(BENCH))
    from bench_train import git_commit
    env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "python": platform.python_version(), "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
           **{pkg: version(pkg) for pkg in ("triton", "bitsandbytes", "transformers", "peft")},
           "commit": git_commit(), "cpu_count": os.cpu_count()}
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        env.update(device_name=p.name, capability=f"sm_{p.major}{p.minor}", sms=p.multi_processor_count,
                   memory_gib=round(p.total_memory / 2**30, 1), driver=nvidia_driver())
    else:
        env["device_name"] = cpu_name()
    return env


def nvidia_driver() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=20)
        return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def cpu_name() -> str:
    if os.path.exists("/proc/cpuinfo"):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def f(v, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def pct(v) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def summary(suite: dict) -> str:
    e, st = suite["environment"], suite["stages"]
    lines = [f"# GPU suite: {e['device_name']}" + (f" ({e['capability']}, {e['sms']} SMs, {e['memory_gib']} GiB, "
                                                    f"driver {e['driver']})" if "capability" in e else ""),
             "",
             f"{suite['verdict']}. {e['date']}, commit {e['commit']}; torch {e['torch']}, CUDA runtime "
             f"{e['cuda_runtime']}, triton {e['triton']}, bitsandbytes {e['bitsandbytes']}, transformers "
             f"{e['transformers']}, peft {e['peft']}, python {e['python']}; `{suite['command']}`",
             "", "| stage | status | seconds | timeout s |", "|---|---|---:|---:|"]
    for name in STAGES:
        s = st.get(name)
        if s:
            lines.append(f"| {name} | {s['status']} | {s['elapsed_s']:.0f} | {s['timeout_s']:.0f} |")
    lines.append(f"| total | | {suite['elapsed_s']:.0f} | {suite['total_budget_s']} |")

    c = st.get("correctness")
    if c:
        n = c["counts"]
        lines += ["", "## Correctness", "",
                  f"{n['passed']} passed, {n['failed']} failed, {n['error']} errors, {n['skipped']} skipped "
                  f"(`pytest` shards: {', '.join(c['shards'])})."]
        for case in c["failed"]:
            lines += [f"- **{case['outcome']}** `{case['test']}`: {case['message'].splitlines()[0][:300] if case['message'] else ''}"]
        for p in c["problems"]:
            lines += [f"- {p.splitlines()[0]}"]
        reasons: dict[str, int] = {}
        for case in c["skipped"]:
            reasons[case["message"]] = reasons.get(case["message"], 0) + 1
        for reason, k in reasons.items():
            lines.append(f"- skipped {k}: {reason}")
        slow = sorted((x for x in c["cases"] if x["outcome"] == "passed"), key=lambda x: -x["time_s"])[:5]
        if slow:
            lines.append("- slowest: " + ", ".join(f"`{x['test'].split('::')[-1]}` {x['time_s']:.0f}s" for x in slow))

    for name, title in (("nf4", "NF4 kernels (`bench_nf4.py --quick`)"), ("train", "Training step (`bench_train.py --quick`)")):
        b = st.get(name)
        if not b:
            continue
        lines += ["", f"## {title}", ""]
        if b["status"] != "passed":
            lines.append(f"{b['status']}: {b.get('problem', '').splitlines()[0] if b.get('problem') else ''}")
        elif name == "nf4":
            lines += nf4_tables(b["result"])
        else:
            sys.path.insert(0, str(BENCH))
            import bench_train
            lines.append(bench_train.table(b["result"]))
    return "\n".join(lines) + "\n"


def nf4_tables(r: dict) -> list[str]:
    lines = [f"Weights NF4 (blocksize 64, double quant), x bf16, {r['device_name']}; ms = "
             + ("triton.testing.do_bench median (L2 flushed)" if r["device"] == "cuda" else f"median of {r['reps']} calls")
             + (f". Bandwidth references: spec-sheet peak {f(r.get('peak_gbs'), '.0f')} GB/s "
                f"({r.get('peak_source') or 'not in the table'}), measured device-to-device copy "
                f"{f(r.get('copy_gbs'), '.0f')} GB/s." if r["device"] == "cuda" else "."),
             "", "| proj | N x K | M | ours triton ms | ours torch ms | bnb matmul_4bit ms | bnb gemv_4bit ms | "
             "dense bf16 ms | bnb/triton | triton/dense | gemv_4bit/triton | triton GB/s | of peak | of copy | "
             "bnb gemv GB/s | max rel err triton |",
             "|---|---|---:|" + "---:|" * 13]
    for x in r["rows"]:
        if x["op"] != "matmul":
            continue
        g = x.get
        lines.append(f"| {x['proj']} | {x['N']}x{x['K']} | {x['M']} | {f(g('ours_triton_ms'))} | {f(g('ours_ms'))} | "
                     f"{f(g('bnb_matmul_ms'))} | {f(g('bnb_gemv_ms'))} | {f(g('dense_ms'))} | "
                     f"{f(g('bnb_over_triton'), '.2f')} | {f(g('triton_over_dense'), '.2f')} | "
                     f"{f(g('bnb_gemv_over_triton'), '.2f')} | {f(g('ours_triton_gbs'), '.0f')} | "
                     f"{pct(g('ours_triton_of_peak'))} | {pct(g('ours_triton_of_copy'))} | {f(g('bnb_gemv_gbs'), '.0f')} | "
                     f"{f(g('ours_triton_rel_err'), '.1e')} |")
    deq = [x for x in r["rows"] if x["op"] == "dequantize"]
    if deq:
        lines += ["", "| proj | N x K | dequantize ours ms | NF4Linear path ms | bnb ms |", "|---|---|---:|---:|---:|"]
        lines += [f"| {x['proj']} | {x['N']}x{x['K']} | {f(x['ours_ms'])} | {f(x['ours_lyr_ms'])} | {f(x['bnb_ms'])} |"
                  for x in deq]
    if r.get("targets"):
        lines += ["", "Targets:"] + [f"- {'met' if ok else '**NOT met**'}: {k}" for k, ok in r["targets"].items()]
    return lines


# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="smoke sizes: no test_triton_nf4.py, tiny benchmark shapes")
    ap.add_argument("--out", default=None, help="results folder (default: results/gpu, on cpu results/gpu-suite-cpu)")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {', '.join(STAGES)} (default: all)")
    ap.add_argument("--tests", nargs="+", default=None, help="pytest paths for the correctness stage instead of its "
                    "shards (one shard), e.g. tests/test_gpu.py::test_train_py_qlora_on_gpu_saves_an_adapter_peft_loads")
    args = ap.parse_args(argv)
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in args.stages if s not in STAGES]
    if bad or not args.stages:
        ap.error(f"--stages {','.join(args.stages)}: expected a comma list of {', '.join(STAGES)}")
    args.out = Path(args.out) if args.out else ROOT / "results" / ("gpu" if args.device == "cuda" else "gpu-suite-cpu")
    if args.out.exists() and not args.out.is_dir():
        ap.error(f"--out {args.out} is a file, not a folder")
    return args


def check_gpu(device: str) -> None:
    """No usable GPU: one line, exit 2 (raised as UsageError)."""
    import torch
    if device != "cuda":
        return
    if not torch.cuda.is_available():
        raise UsageError(f"no CUDA GPU: torch.cuda.is_available() is False (torch {torch.__version__}, CUDA "
                         f"{torch.version.cuda or 'none'}); `--device cpu --quick` runs the CPU version of this suite")
    cap = torch.cuda.get_device_capability(0)
    if cap < (8, 0):
        raise UsageError(f"{torch.cuda.get_device_name(0)} is sm_{cap[0]}{cap[1]}: the Triton NF4 kernels and bf16 "
                         "training need sm_80 (A100) or newer")


def run(args) -> int:
    t_start = time.time()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    budget = {k: v for k, v in BUDGET[args.device].items() if k in args.stages}
    total = TOTAL[args.device]
    deadline = t_start + total
    env = child_env(args.device)
    suite = {"command": " ".join(["python benchmarks/gpu_suite.py"] + (args.argv or [])),
             "device": args.device, "quick": args.quick, "environment": environment(args.device),
             "total_budget_s": total, "budget_s": budget, "stages": {}}
    e = suite["environment"]
    print(f"gpu_suite: {e['device_name']}, torch {e['torch']}, CUDA {e['cuda_runtime']}, triton {e['triton']}; "
          f"stages {', '.join(budget)} (budget {', '.join(f'{k} {v}s' for k, v in budget.items())}; total {total}s); "
          f"results in {out}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_suite_"))
    extra = bench_args(args, work)
    try:
        names = list(budget)
        for i, name in enumerate(names):
            later = sum(budget[k] for k in names[i + 1:])  # kept for the stages still to come
            timeout = max(1.0, deadline - time.time() - later)
            print(f"[{name}] started ({timeout:.0f}s at most)", flush=True)
            t0 = time.time()
            if name == "correctness":
                rec = stage_correctness(args, out, env, timeout)
                (out / "correctness.json").write_text(json.dumps(rec, indent=2) + "\n")
            elif name == "nf4":
                rec = stage_bench("bench_nf4", "bench_nf4.py", extra["nf4"], f"bench_nf4_{args.device}.json",
                                  args, out, env, timeout)
            else:
                rec = stage_bench("bench_train", "bench_train.py", extra["train"], f"bench_train_*_{args.device}_*.json",
                                  args, out, env, timeout)
            rec.update(elapsed_s=time.time() - t0, timeout_s=timeout)
            suite["stages"][name] = rec
            print(f"[{name}] {rec['status']} in {rec['elapsed_s']:.0f}s", flush=True)
            if name == "correctness" and rec["status"] != "passed":
                print_failures(rec)
                break  # no benchmarks of code that is not correct
            if rec["status"] != "passed":
                print(f"  {rec.get('problem', '')}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    suite["elapsed_s"] = time.time() - t_start
    code, suite["verdict"] = verdict(suite, args)
    slim = {k: v for k, v in suite.items() if k != "stages"}
    slim["stages"] = {k: {kk: vv for kk, vv in v.items() if kk not in ("result", "cases")} for k, v in suite["stages"].items()}
    (out / "suite.json").write_text(json.dumps(slim, indent=2) + "\n")
    md = summary(suite)
    (out / "summary.md").write_text(md)
    print("\n" + md, flush=True)
    print(f"gpu_suite: {suite['verdict']} ({suite['elapsed_s']:.0f}s); results in {out}", flush=True)
    return code


def verdict(suite: dict, args) -> tuple[int, str]:
    st = suite["stages"]
    c = st.get("correctness")
    if c and c["status"] != "passed":
        return 1, f"FAILED: correctness {c['status']}, benchmarks not run"
    bad = [f"{k} {v['status']}" for k, v in st.items() if v["status"] != "passed"]
    if bad:
        return 1, "FAILED: " + ", ".join(bad)
    if c and args.device == "cuda" and c["counts"]["skipped"]:
        return 1, f"INCOMPLETE: {c['counts']['skipped']} tests skipped on the GPU (listed below)"
    return 0, "PASSED" + ("" if args.device == "cuda" else " (CPU run: the cuda tests are skipped, no GPU figures)")


def print_failures(rec: dict) -> None:
    for p in rec["problems"]:
        print(f"  {p}", flush=True)
    for case in rec["failed"]:
        print(f"  FAILED {case['test']}\n    " + "\n    ".join((case["detail"] or case["message"]).splitlines()),
              flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.argv = argv
    try:
        check_gpu(args.device)
    except UsageError as e:
        print(f"gpu_suite.py: error: {e}", file=sys.stderr)
        return 2
    return run(args)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill from outside still stops the subprocesses
    sys.exit(main())
