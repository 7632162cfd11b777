"""One training step, ours vs the Hugging Face stack, on the same weights, batch, adapter and optimizer.

    python benchmarks/bench_train.py --size small                          # CPU, ~15-25 min on 2 cores
    python benchmarks/bench_train.py --size 7b --device cuda
    python benchmarks/bench_train.py --size tiny --seq-len 128 --modes lora  # seconds
    python benchmarks/bench_train.py --quick [--device cuda]               # the GPU suite's run (QUICK)

A step is forward, backward, gradient clipping (0.3) and AdamW (lr 2e-4, the same torch.optim.AdamW
construction on both sides), on one packed batch of --tokens-per-step tokens (rows of --seq-len):

- ours:     `train.build_model` (load -> NF4-quantize while streaming -> LoRA), `train.loss_sum`
            (the head on trained tokens only, cross-entropy gradient taken in the forward) and
            `train.make_optimizer`: the product's own step.
- baseline: `transformers.LlamaForCausalLM` (SDPA attention) + `peft` LoRA loaded with
            `PeftModel.from_pretrained(..., is_trainable=True)`, + bitsandbytes 4-bit for QLoRA
            (`BitsAndBytesConfig`: nf4, double quant, compute dtype = the run's dtype), loss from
            `model(..., labels=...)`, gradient checkpointing by `gradient_checkpointing_enable()`
            (non-reentrant). This is what TRL's SFTTrainer runs, except that we do not call peft's
            `prepare_model_for_kbit_training`, which upcasts the 16-bit weights to fp32 (a no-op in an fp32
            run; on CUDA it would compare different precisions).

Modes: full, lora, qlora, each without and with gradient checkpointing (`+gc`). LoRA: r 16, alpha 32,
all seven projections, --lora-dropout (default 0.05, the QLoRA recipe's). Precision (--dtype): fp32, or bf16
weights with each side's bf16 rule, as each runs in training: ours as train.py (autocast on CUDA; on CPU the
bf16 weights alone, the adapters casting their inputs), HF under bf16 autocast as the HF Trainer with
bf16=True, with bitsandbytes' compute dtype bf16. Default: fp32 on CPU, bf16 on CUDA.

Same computation on both sides, checked before anything is timed (benchmarks/parity.py, which
tests/test_gpu.py shares): the same random HF checkpoint and PEFT adapter loaded by both, the same samples
packed by each side (ours: parity.pack rows with doc_ids; HF: parity.hf_rows, position_ids restarting at each
sample, labels in HF's convention); step 0 runs with LoRA dropout switched off and the losses must agree within
2e-5 (fp32) and the gradients of every adapter weight (full mode: of layer 0, the last layer, the final norm,
the embeddings and the head) within 2e-5 of their max magnitude (QLoRA 1e-4 and 2e-2 where a q/k weight spans
several double-quant groups: double quantization is not invariant under HF's rotary row order there, so the two
stacks hold slightly different NF4 q/k weights), else the run stops: a speed comparison of different
computations is worthless. bf16 runs also run HF's step in fp32 on the same weights, in a third process
that exits before the timing, and ours must be within 2e-2 of that reference or no further from it than twice
HF's own bf16 step (parity.judge).

Timing and memory: every configuration runs in its own fresh process (ours and HF side by side, one
pair per mode and seq-len); the parent asks them for steps alternately (ours, HF, HF, ours, ...) so
drifting machine load hits both alike, and reports tokens/s = tokens per step / median step time after
warm-up. Peak memory: CUDA, torch.cuda.max_memory_allocated over the timed steps; CPU, the process's
peak RSS (VmHWM) over the timed steps, reset after step 0 (the optimizer state exists by then) once
freed heap pages have been returned (malloc_trim), so the figure is the steady training peak, not the
load. "above imports" subtracts the RSS the process had after its imports (train.py's for ours; torch +
transformers + peft + bitsandbytes for HF). /proc/loadavg is recorded around each pair. Both processes get
train.py's process settings (`train.PROCESS_ENV`: MKL's strict reproducibility and c10's transparent huge
pages for CPU tensors), so the baseline gets the same allocator; set THP_MEM_ALLOC_ENABLE=0 to run both without.

Output: a markdown table on stdout, results/bench_train_<size>_<device>_<dtype>.json, and a PNG bar chart when
matplotlib is installed.
"""
import argparse
import ctypes
import datetime
import gc
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from parity import (ALPHA, R, SIZES, ParityError, autocast, build_hf, build_ours, judge, make_batch,  # noqa: E402
                    make_inputs, n_params, runs, saved_grads, side_spec)

CLIP = 0.3
MODES = ("full", "full+gc", "lora", "lora+gc", "qlora", "qlora+gc")
# --quick: what benchmarks/gpu_suite.py runs. On CUDA the two modes it reports, sized for its time budget (134M
# parameters, 8 rows of 1024 tokens: enough work that a step is not all kernel launches); on CPU a smoke run of
# the whole script on the tiny model (QLoRA, the mode that exercises every stack's parts).
QUICK = {
    "cuda": dict(size="small", seq_len=[1024], modes=["lora", "qlora"], tokens_per_step=8192, reps=10, warmup=2),
    "cpu": dict(size="tiny", seq_len=[64], modes=["qlora"], tokens_per_step=128, reps=1, warmup=0),
}
MARK = "@@bench "  # replies from a child start with this; anything else on its stdout is library chatter


# ---------------------------------------------------------------------------------------------
# The children: one configuration each, driven over stdin/stdout.


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap pages back, so RSS is what is in use
    except OSError:  # not glibc
        pass


def child(spec: dict) -> None:
    def reply(**kw):
        print(MARK + json.dumps(kw), flush=True)

    device = torch.device(spec["device"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
    torch.manual_seed(0)
    if spec["impl"] == "hf":  # the baseline's imports count towards its process, as they would in a real run
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
        import transformers  # noqa: F401
    else:
        import train  # noqa: F401
    _trim()
    rss_imports = _status_kib("VmRSS") * 1024
    t0 = time.perf_counter()
    build = build_hf if spec["impl"] == "hf" else build_ours
    model, params, opt, loss_fn, set_dropout, grads = build(spec, device, dtype)
    reply(ready=True, setup_s=time.perf_counter() - t0, rss_imports=rss_imports,
          trainable=sum(p.numel() for p in params), env={k: os.environ.get(k) for k in process_env()})

    def step(dump: str | None = None) -> dict:
        sync()
        t, cpu = time.perf_counter(), time.process_time()
        with autocast(device, dtype):
            loss = loss_fn()
        loss.backward()
        if dump:
            from safetensors.torch import save_file
            save_file(saved_grads(grads(model)), dump)
        gnorm = torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        out = {"loss": loss.item(), "grad_norm": float(gnorm)}  # .item(): the step is done when its loss is read
        sync()
        out["time"], out["cpu"] = time.perf_counter() - t, time.process_time() - cpu
        return out

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["op"] == "step0":
                set_dropout(0.0)
                r = step(cmd["dump"])
                set_dropout(spec["lora_dropout"])
                _trim()  # then measure the steady state: the optimizer state exists from here on
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                else:
                    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
                reply(rss_after_step0=_status_kib("VmRSS") * 1024, **r)
            elif cmd["op"] == "step":
                reply(**step())
            elif cmd["op"] == "mem":
                if device.type == "cuda":
                    reply(peak=torch.cuda.max_memory_allocated(), reserved=torch.cuda.max_memory_reserved())
                else:
                    reply(peak=_status_kib("VmHWM") * 1024)
            elif cmd["op"] == "quit":
                return
        except torch.OutOfMemoryError as e:
            reply(error=f"out of memory: {str(e).splitlines()[0]}")
            return


def process_env() -> dict[str, str]:
    """train.py's process settings (MKL_CBWR, THP_MEM_ALLOC_ENABLE), given to both sides alike: the HF
    baseline gets the same allocator, so the ratios measure the code. A value set in this environment wins
    (THP_MEM_ALLOC_ENABLE=0 measures both without huge pages)."""
    from train import PROCESS_ENV
    return {k: os.environ.get(k, v) for k, v in PROCESS_ENV.items()}


class Child:
    """A configuration's process: JSON commands in, JSON replies out; stderr goes to a log file."""

    def __init__(self, spec: dict, log: Path):
        self.log = log
        self.proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, cwd=ROOT,
                                     env={**os.environ, **process_env()})

    def ask(self, op: str, **kw) -> dict:
        self.proc.stdin.write(json.dumps(dict(op=op, **kw)) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        self.proc.wait()
        tail = "".join(self.log.read_text().splitlines(True)[-15:])
        return {"error": f"process exited with {self.proc.returncode}:\n{tail}"}

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---------------------------------------------------------------------------------------------
# The parent: parity, alternating timing, the table.


def run_pair(mode: str, seq_len: int, args, work: Path, batch_file: Path, tokens: int) -> dict:
    row = {"mode": mode, "seq_len": seq_len, "tokens_per_step": tokens, "loadavg_before": loadavg()}
    children = {}
    try:
        for name, impl, dtype in runs(args.dtype):  # ours, hf, and in bf16 HF's fp32 step as the reference
            spec = side_spec(work, batch_file, impl, mode, args.size, args.device, dtype, args.lora_dropout,
                             seq_len=seq_len, perturb=args.perturb_ours if name == "ours" else 0.0)
            children[name] = Child(spec, work / f"log_{name}_{mode}_{seq_len}.txt")
        for name, c in children.items():  # all load at once; nothing is timed yet
            r = c.read()
            if "error" in r:
                raise RuntimeError(f"{name} {mode} failed to start: {r['error']}")
            row[f"{name}_setup_s"], row[f"{name}_rss_imports"] = r["setup_s"], r["rss_imports"]
            row[f"{name}_trainable"], row[f"{name}_env"] = r["trainable"], r["env"]
        # ---- step 0: the same computation, or stop
        from safetensors.torch import load_file
        loss, grads = {}, {}
        for name, c in children.items():
            r = c.ask("step0", dump=str(work / f"grads_{name}.safetensors"))
            if "error" in r:
                return dict(row, error=f"{name}: {r['error']}")
            loss[name], grads[name] = r["loss"], load_file(work / f"grads_{name}.safetensors")
        if "ref" in children:  # done: its memory is not the timed processes' to share
            children.pop("ref").close()
        figures, failed = judge(mode, args.dtype, loss, grads, args.size)
        row.update(figures)
        if failed:
            raise ParityError(f"{mode} seq {seq_len}: " + "; ".join(failed)
                              + ". The two sides do not compute the same step; nothing was timed.")
        # ---- alternate: ours, hf | hf, ours | ... so drift in load hits both alike
        times, cpu = {"ours": [], "hf": []}, {"ours": [], "hf": []}
        for i in range(args.warmup + args.reps):
            for impl in (("ours", "hf") if i % 2 == 0 else ("hf", "ours")):
                r = children[impl].ask("step")
                if "error" in r:
                    return dict(row, error=f"{impl}: {r['error']}")
                if i >= args.warmup:
                    times[impl].append(r["time"])
                    cpu[impl].append(r["cpu"])
        for impl, c in children.items():
            m = c.ask("mem")
            row[f"{impl}_step_s"] = statistics.median(times[impl])
            row[f"{impl}_step_times"] = times[impl]
            row[f"{impl}_step_cpu_s"] = cpu[impl]  # process CPU time per step: less sensitive to other load
            row[f"{impl}_tok_s"] = tokens / row[f"{impl}_step_s"]
            row[f"{impl}_peak"] = m["peak"]
            if args.device == "cpu":
                row[f"{impl}_peak_above_imports"] = m["peak"] - row[f"{impl}_rss_imports"]
        row["speed_ratio"] = row["ours_tok_s"] / row["hf_tok_s"]
        row["speed_ratio_best_step"] = min(times["hf"]) / min(times["ours"])
        row["cpu_time_ratio"] = statistics.median(cpu["hf"]) / statistics.median(cpu["ours"])
        row["mem_ratio"] = row["ours_peak"] / row["hf_peak"]
        if args.device == "cpu":
            row["mem_ratio_above_imports"] = row["ours_peak_above_imports"] / row["hf_peak_above_imports"]
    finally:
        for c in children.values():
            c.close()
    row["loadavg_after"] = loadavg()
    return row


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def git_commit() -> str:
    """The code measured: HEAD, with '+dirty' when tracked files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    for line in Path("/proc/cpuinfo").read_text().splitlines() if os.path.exists("/proc/cpuinfo") else []:
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    return "cpu"


def table(result: dict) -> str:
    mib = lambda b: f"{b / 2**20:,.0f}"  # noqa: E731
    cpu = result["device"] == "cpu"
    lines = [f"**{result['size']}** ({result['params'] / 1e6:.1f}M params), {result['device_name']}, "
             f"{result['dtype']}, torch {result['torch']}, {result['date']}; {result['tokens_per_step']} tokens/step, "
             f"median of {result['reps']} steps after {result['warmup'] + 1} warm-up; LoRA r {R}, alpha {ALPHA}, "
             f"dropout {result['lora_dropout']}, 7 projections; peak = "
             + ("peak RSS of the process during the timed steps" if cpu else "torch.cuda.max_memory_allocated")
             + "; both sides run with " + " ".join(f"{k}={v}" for k, v in result.get("process_env", {}).items()), "",
             "| seq | mode | ours tok/s | HF tok/s | speed ours/HF | ours peak MiB | HF peak MiB | mem ours/HF |"
             + (" mem ours/HF above imports |" if cpu else "") + " step-0 \\|Δloss\\| | grad err | load avg |",
             "|---:|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if cpu else "") + "---:|---:|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['seq_len']} | {r['mode']} | {r['error'].splitlines()[0]} |")
            continue
        lines.append(f"| {r['seq_len']} | {r['mode']} | {r['ours_tok_s']:,.0f} | {r['hf_tok_s']:,.0f} | "
                     f"**{r['speed_ratio']:.2f}x** | {mib(r['ours_peak'])} | {mib(r['hf_peak'])} | "
                     f"**{r['mem_ratio']:.2f}x** |" + (f" {r['mem_ratio_above_imports']:.2f}x |" if cpu else "")
                     + f" {r['loss0_diff']:.1e} | {r['grad_rel_err']:.1e}"
                     + f" | {r['loadavg_before']} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in result["rows"] if "error" not in r]
    seqs = sorted({r["seq_len"] for r in rows})
    if not rows:
        return False
    fig, axes = plt.subplots(2, len(seqs), figsize=(6 * len(seqs), 7), squeeze=False)
    for j, seq in enumerate(seqs):
        rs = [r for r in rows if r["seq_len"] == seq]
        x = range(len(rs))
        for i, (key, scale, label) in enumerate((("tok_s", 1, "tokens/s"), ("peak", 2**-20, "peak MiB"))):
            ax = axes[i][j]
            ax.bar([v - 0.2 for v in x], [r[f"ours_{key}"] * scale for r in rs], 0.4, label="ours")
            ax.bar([v + 0.2 for v in x], [r[f"hf_{key}"] * scale for r in rs], 0.4, label="transformers+peft+bnb")
            ax.set_xticks(list(x), [r["mode"] for r in rs])
            ax.set_ylabel(label)
            ax.set_title(f"{result['size']}, seq {seq}: {label}")
            ax.legend(fontsize=8)
    fig.suptitle(f"One training step, {result['device_name']}, {result['dtype']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default=None, choices=list(SIZES), help="default: small (--quick on cpu: tiny)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: fp32 on cpu, bf16 on cuda")
    ap.add_argument("--quick", action="store_true", help="the GPU suite's sizes (QUICK): LoRA and QLoRA only, one "
                    "sequence length; on cpu QLoRA on the tiny model. Flags given explicitly still win")
    ap.add_argument("--seq-len", type=int, nargs="+", default=None, help="default: 512 2048")
    ap.add_argument("--modes", nargs="+", default=None, choices=MODES, help="default: all six")
    ap.add_argument("--tokens-per-step", type=int, default=None, help="rows per step = this // seq-len (at least 1; "
                    "default 2048)")
    ap.add_argument("--reps", type=int, default=None, help="timed steps per side (default 6 on cpu: shared CPUs are noisy, 10 on cuda)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps after step 0 (default 1)")
    ap.add_argument("--lora-dropout", type=float, default=0.05)
    ap.add_argument("--work-dir", default=None, help="checkpoint, adapter, batches, logs (default: a temp folder, reused)")
    ap.add_argument("--out-dir", default=str(ROOT / "results"))
    ap.add_argument("--perturb-ours", type=float, default=0.0, help=argparse.SUPPRESS)  # tests only
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return {}
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    defaults = QUICK[args.device] if args.quick else dict(size="small", seq_len=[512, 2048], modes=list(MODES),
                                                          tokens_per_step=2048, reps=None, warmup=1)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.reps = args.reps or (10 if args.device == "cuda" else 6)
    for s in args.seq_len:
        if s < 16 or s > 4096:
            raise SystemExit(f"--seq-len {s}: expected 16..4096 (the checkpoint's max_position_embeddings)")

    work = Path(args.work_dir or Path(tempfile.gettempdir()) / f"bench_train_{args.size}_{args.dtype}")
    t0 = time.time()
    make_inputs(work, args.size, args.dtype, args.lora_dropout)
    print(f"inputs in {work} ({time.time() - t0:.0f}s); load avg {loadavg()}", file=sys.stderr, flush=True)
    result = {"size": args.size, "params": n_params(SIZES[args.size]), "shape": SIZES[args.size],
              "device": args.device, "device_name": device_name(args.device), "dtype": args.dtype,
              "torch": torch.__version__.split("+")[0], "date": datetime.date.today().isoformat(),
              "tokens_per_step": args.tokens_per_step, "reps": args.reps, "warmup": args.warmup,
              "lora_dropout": args.lora_dropout, "r": R, "alpha": ALPHA, "rows": []}
    result["commit"] = git_commit()
    result["process_env"] = process_env()
    result["versions"] = {}
    for pkg in ("transformers", "peft", "bitsandbytes"):
        try:
            result["versions"][pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    for seq_len in args.seq_len:
        batch_file = work / f"batch_{seq_len}_{args.tokens_per_step}.pt"
        batch = make_batch(batch_file, seq_len, args.tokens_per_step, SIZES[args.size]["vocab"])
        tokens = batch["tokens"].numel()
        for mode in args.modes:
            t = time.time()
            row = run_pair(mode, seq_len, args, work, batch_file, tokens)
            row["trained_tokens"] = int((batch["labels"] != -100).sum())
            result["rows"].append(row)
            brief = row.get("error") or (f"ours {row['ours_tok_s']:.0f} tok/s vs HF {row['hf_tok_s']:.0f} "
                                         f"({row['speed_ratio']:.2f}x), peak {row['mem_ratio']:.2f}x, "
                                         f"loss0 diff {row['loss0_diff']:.1e}")
            print(f"seq {seq_len} {mode}: {brief} [{time.time() - t:.0f}s, load {row['loadavg_before']}]",
                  file=sys.stderr, flush=True)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"bench_train_{args.size}_{args.device}_{args.dtype}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"\nwrote {stem.with_suffix('.json')}" + (f" and {stem.with_suffix('.png')}" if plot(result, stem.with_suffix(".png")) else ""))
    return result


if __name__ == "__main__":
    try:
        main()
    except ParityError as e:
        raise SystemExit(f"parity check failed: {e}")
