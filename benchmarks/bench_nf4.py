"""NF4 dequantize and matmul at Llama-2 projection shapes: ours vs bitsandbytes vs a dense matmul.

    python benchmarks/bench_nf4.py [--device cpu|cuda] [--shapes 7b|13b|70b|all|tiny|7b,70b] [--ms 1,16,512]
                                   [--reps N] [--peak-gbs GB/s] [--quick] [--out-dir results]

For each weight W [N, K] (bf16, quantized by bitsandbytes: NF4, blocksize 64, double quantization) it times

    dequantize   ours:     quant.dequantize_nf4 (the readable PyTorch reference)
                 ours_lyr: NF4Linear.dequantize()'s path, the one nf4_matmul's torch backend uses
                 bnb:      bitsandbytes.functional.dequantize_4bit
    y = x @ W.T  ours:        quant.nf4_matmul(backend="torch")   (dequantize, then torch's matmul)
                 ours_triton: quant.nf4_matmul(backend="triton")  (the fused kernels; CUDA, or the interpreter)
                 bnb_deq_mm:  x @ dequantize_4bit(W).T
                 bnb_matmul:  bitsandbytes.matmul_4bit            (what bnb.nn.Linear4bit runs)
                 bnb_gemv:    bitsandbytes.functional.gemv_4bit   (CUDA, M = 1: bnb's decode kernel)
                 dense:       x @ W.T with W in bf16

with x [M, K] bf16, under torch.no_grad(). Every output is first checked against x @ W_nf4.T in fp32 (the
error is in the JSON). Timings: on CUDA triton.testing.do_bench (median; L2 flushed between calls, so a
weight that fits L2 is still read from HBM); on CPU the median of --reps wall-clock calls, the
implementations taking turns so that load from other processes hits all of them alike. On CUDA the GEMV
rows (M = 1) also report GB/s: the bytes a GEMV must read (packed weight, 8-bit absmax, second-level
scales, x) and write (y) over the time, against two references: the card's peak from its spec sheet (a table
by device name, or --peak-gbs) and the bandwidth this run measures for a 1 GiB device-to-device copy
(bytes read + written over do_bench's median time), which is what the memory system delivers in practice.
--quick: the two targets' rows only (7B shapes, M = 1 and 4096) on CUDA; the tiny shape on CPU (a smoke run).

Targets (issue 3): CPU no slower than bitsandbytes' CPU path; CUDA: the fused GEMM within 1.15x of dense
bf16 cuBLAS at M = 4096, the GEMV >= 1.3x faster than bnb's gemv_4bit at M = 1.
Table printed; JSON written to <out-dir>/bench_nf4_<device>.json (default results/).
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import quant  # noqa: E402

# (name, N, K) = (projection, out_features, in_features)
SHAPES = {
    "7b": [("q/k/v/o", 4096, 4096), ("gate/up", 11008, 4096), ("down", 4096, 11008)],
    "13b": [("q/k/v/o", 5120, 5120), ("gate/up", 13824, 5120), ("down", 5120, 13824)],
    "70b": [("q/o", 8192, 8192), ("k/v", 1024, 8192), ("gate/up", 28672, 8192), ("down", 8192, 28672)],
    "tiny": [("tiny", 256, 128)],  # a smoke test of this script (also under TRITON_INTERPRET=1)
}

# Peak DRAM bandwidth, GB/s, from the vendors' spec sheets; first match in the device name wins.
PEAK_GBS = [
    ("GH200", 4000), ("H200", 4800), ("H100 PCIe", 2000), ("H100 NVL", 3900), ("H100", 3350), ("B200", 8000),
    ("A100-SXM4-80GB", 2039), ("A100 80GB PCIe", 1935), ("A100", 1555), ("L40", 864), ("L4", 300),
    ("A10", 600), ("T4", 320), ("V100", 900), ("RTX 4090", 1008), ("RTX 3090", 936), ("A6000", 768),
]

MATMULS = ("ours", "ours_triton", "bnb_deq_mm", "bnb_matmul", "bnb_gemv", "dense")
QUICK = {"cuda": dict(shapes="7b", ms="1,4096"), "cpu": dict(shapes="tiny", ms="1,16", reps=2)}


def peak_gbs(name: str) -> float | None:
    return next((gbs for key, gbs in PEAK_GBS if key in name), None)


def copy_gbs(n_bytes: int = 1 << 30) -> float:
    """Achieved bandwidth of a device-to-device copy of n_bytes, GB/s (each byte is read once and written once)."""
    import triton.testing
    a = torch.empty(n_bytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=25, rep=100, return_mode="median")
    del a, b
    torch.cuda.empty_cache()
    return 2 * n_bytes / (ms * 1e-3) / 1e9


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    if os.path.exists("/proc/cpuinfo"):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({torch.get_num_threads()} threads)"
    return "cpu"


def triton_available(device: str) -> bool:
    return device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def time_all(fns: dict, device: str, reps: int, warmup: int) -> dict[str, float]:
    """Median milliseconds per call of each function."""
    for f in fns.values():  # first calls: Triton compiles and autotunes, caches warm up
        f()
    if device == "cuda":
        import triton.testing
        torch.cuda.synchronize()
        return {k: triton.testing.do_bench(f, warmup=25, rep=100, return_mode="median") for k, f in fns.items()}
    times = {k: [] for k in fns}
    for i in range(warmup + reps):
        for k, f in fns.items():  # take turns
            t0 = time.perf_counter()
            f()
            if i >= warmup:
                times[k].append(1e3 * (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in times.items()}


def bench_shape(name: str, N: int, K: int, ms: list[int], device: str, reps: int, warmup: int,
                peak: float | None, copy: float | None = None) -> list[dict]:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF

    torch.manual_seed(0)
    W = (torch.randn(N, K, device=device) * 0.02).to(torch.bfloat16)
    packed, s = bnbF.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
    deq = quant.dequantize_nf4(packed, s)
    assert torch.equal(deq, bnbF.dequantize_4bit(packed, s)), "dequantize_nf4 differs from bitsandbytes"
    rows = []

    layer = quant.NF4Linear.from_weight(W)  # bitsandbytes' quantization again: the same packed data
    assert torch.equal(layer.dequantize(), deq)
    t = time_all({"ours": lambda: quant.dequantize_nf4(packed, s), "ours_lyr": layer.dequantize,
                  "bnb": lambda: bnbF.dequantize_4bit(packed, s)}, device, reps, warmup)
    rows.append({"proj": name, "N": N, "K": K, "op": "dequantize", "M": None, "ours_ms": t["ours"],
                 "ours_lyr_ms": t["ours_lyr"], "bnb_ms": t["bnb"], "bnb_over_ours": t["bnb"] / t["ours"],
                 "bnb_over_ours_lyr": t["bnb"] / t["ours_lyr"]})
    print_row(rows[-1])

    for M in ms:
        x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
        fns = {
            "ours": lambda: quant.nf4_matmul(x, packed, s, backend="torch"),
            "ours_triton": lambda: quant.nf4_matmul(x, packed, s, backend="triton"),
            "bnb_deq_mm": lambda: x @ bnbF.dequantize_4bit(packed, s).t(),
            "bnb_matmul": lambda: bnb.matmul_4bit(x, packed.t(), quant_state=s),
            # bnb's decode kernel. On CPU it expects weights repacked for its AVX512 kernel
            # (quant_state.packing_format_for_cpu) and is wrong on the standard layout: not timed there.
            "bnb_gemv": lambda: bnbF.gemv_4bit(x, packed, state=s),
            "dense": lambda: x @ W.t(),
        }
        if not triton_available(device):
            del fns["ours_triton"]
        if device != "cuda" or M != 1:
            del fns["bnb_gemv"]
        row = {"proj": name, "N": N, "K": K, "op": "matmul", "M": M}
        ref = x.float() @ deq.float().t()
        with torch.no_grad():
            for k, f in fns.items():
                row[f"{k}_rel_err"] = ((f().float() - ref).abs().max() / ref.abs().max()).item()
            del ref
            t = time_all(fns, device, reps, warmup)
        for k, v in t.items():
            row[f"{k}_ms"] = v
        row["bnb_over_ours"] = t["bnb_matmul"] / t["ours"]
        row["ours_over_dense"] = t["ours"] / t["dense"]
        if "ours_triton" in t:
            row["bnb_over_triton"] = t["bnb_matmul"] / t["ours_triton"]
            row["triton_over_dense"] = t["ours_triton"] / t["dense"]
        if "bnb_gemv" in t:
            row["bnb_gemv_over_triton"] = t["bnb_gemv"] / t["ours_triton"]
            # what a GEMV has to move: the packed weight, the 8-bit absmax and its fp32 scales, x and y
            moved = packed.numel() + s.absmax.numel() + 4 * (s.state2.absmax.numel() + 256) + 2 * (K + N)
            row["gemv_bytes"] = moved
            for k in ("ours_triton", "bnb_gemv"):
                row[f"{k}_gbs"] = moved / (t[k] * 1e-3) / 1e9
                if peak:
                    row[f"{k}_of_peak"] = row[f"{k}_gbs"] / peak
                if copy:
                    row[f"{k}_of_copy"] = row[f"{k}_gbs"] / copy
        rows.append(row)
        print_row(row)
    return rows


def fmt(v, spec=".2f") -> str:
    return "-" if v is None else format(v, spec)


def print_header(device: str) -> None:
    print("ms per call (median). deq rows: ours = dequantize_nf4, lyr = NF4Linear.dequantize's path, bnb_deq = "
          "dequantize_4bit, bnb/ours | bnb/lyr. mm rows: bnb/ours = bnb.matmul_4bit's time over ours (> 1: ours faster)")
    print(f"{'proj':>8} {'N x K':>12} {'op':>5} {'M':>5} | {'ours':>8} {'lyr':>8} {'triton':>8} {'bnb_deq(+mm)':>12} "
          f"{'bnb_mm4':>8} {'bnb_gemv':>8} {'dense':>8} | {'bnb/ours':>10} {'ours/dense':>10} {'bnb/triton':>10} "
          f"{'triton/dense':>12} {'gemv/triton':>11} {'GB/s':>6}")


def print_row(r: dict) -> None:
    g = r.get
    op = "deq" if r["op"] == "dequantize" else "mm"
    if r["op"] == "dequantize":
        times = f"{fmt(g('ours_ms')):>8} {fmt(g('ours_lyr_ms')):>8} {'-':>8} {fmt(g('bnb_ms')):>12} {'-':>8} {'-':>8} {'-':>8}"
        ratios = (f"{fmt(g('bnb_over_ours')) + '|' + fmt(g('bnb_over_ours_lyr')):>10} {'-':>10} {'-':>10} {'-':>12} "
                  f"{'-':>11} {'-':>6}")
    else:
        times = (f"{fmt(g('ours_ms')):>8} {'-':>8} {fmt(g('ours_triton_ms')):>8} {fmt(g('bnb_deq_mm_ms')):>12} "
                 f"{fmt(g('bnb_matmul_ms')):>8} {fmt(g('bnb_gemv_ms')):>8} {fmt(g('dense_ms')):>8}")
        ratios = (f"{fmt(g('bnb_over_ours')):>10} {fmt(g('ours_over_dense')):>10} {fmt(g('bnb_over_triton')):>10} "
                  f"{fmt(g('triton_over_dense')):>12} {fmt(g('bnb_gemv_over_triton')):>11} "
                  f"{fmt(g('ours_triton_gbs'), '.0f'):>6}")
    print(f"{r['proj']:>8} {str(r['N']) + 'x' + str(r['K']):>12} {op:>5} {fmt(r['M'], 'd'):>5} | {times} | {ratios}",
          flush=True)


def targets(rows: list[dict], device: str) -> dict:
    """The issue's targets, each row judged: True = met."""
    out = {}
    if device == "cpu":
        for r in rows:  # no slower than bitsandbytes' CPU path
            key = f"{r['proj']} {r['N']}x{r['K']} "
            if r["op"] == "dequantize":
                out[key + "dequantize: NF4Linear.dequantize path <= bnb"] = r["bnb_over_ours_lyr"] >= 1.0
                out[key + "dequantize: dequantize_nf4 (reference) <= bnb"] = r["bnb_over_ours"] >= 1.0
            else:
                out[key + f"matmul M={r['M']}: ours <= bnb.matmul_4bit"] = r["bnb_over_ours"] >= 1.0
    else:
        for r in rows:
            if r["op"] == "matmul" and r["M"] == 4096 and "triton_over_dense" in r:
                out[f"{r['proj']} {r['N']}x{r['K']} M=4096: triton <= 1.15x dense"] = r["triton_over_dense"] <= 1.15
            if r["op"] == "matmul" and "bnb_gemv_over_triton" in r:
                out[f"{r['proj']} {r['N']}x{r['K']} M=1: triton >= 1.3x faster than bnb gemv_4bit"] = \
                    r["bnb_gemv_over_triton"] >= 1.3
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--shapes", default=None, help="7b, 13b, 70b, all (= 7b,13b,70b), tiny, or a comma list "
                    "(default: 7b on cpu, 7b,70b on cuda)")
    ap.add_argument("--ms", default=None, help="rows of x, comma separated (default: 1,16,512 on cpu, "
                    "1,16,512,4096 on cuda)")
    ap.add_argument("--reps", type=int, default=5, help="timed calls per implementation on cpu (cuda: do_bench)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (cpu; default: torch's)")
    ap.add_argument("--peak-gbs", type=float, default=None, help="the GPU's peak memory bandwidth (default: "
                    "looked up by device name)")
    ap.add_argument("--quick", action="store_true", help="the GPU suite's rows (QUICK): 7B shapes at M = 1 and 4096 "
                    "on cuda, the tiny shape on cpu; --shapes/--ms given explicitly still win")
    ap.add_argument("--out-dir", default=str(ROOT / "results"))
    args = ap.parse_args(argv)
    if args.quick:
        q = QUICK[args.device]
        args.shapes, args.ms = args.shapes or q["shapes"], args.ms or q["ms"]
        args.reps = q.get("reps", args.reps)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_nf4.py: --device cuda but torch.cuda.is_available() is False")
    cpu = args.device == "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = args.shapes or ("7b" if cpu else "7b,70b")
    names = ["7b", "13b", "70b"] if shapes == "all" else shapes.split(",")
    for n in names:
        if n not in SHAPES:
            raise SystemExit(f"bench_nf4.py: --shapes {shapes!r}: unknown {n!r}, expected 7b, 13b, 70b, all or tiny")
    ms = [int(m) for m in (args.ms or ("1,16,512" if cpu else "1,16,512,4096")).split(",")]
    name = device_name(args.device)
    peak = args.peak_gbs or (peak_gbs(name) if not cpu else None)
    copy = None if cpu else copy_gbs()
    print(f"NF4 (bitsandbytes format, blocksize 64, double quant) at Llama-2 {'+'.join(names)} shapes, bf16, "
          f"M = {ms}, on {name}")
    if cpu:
        print(f"CPU: {args.reps} timed calls each, implementations taking turns; the default (7B shapes, "
              f"M = 1,16,512) takes 0.5-3 minutes on 2 cores. Load average now: {os.getloadavg()[0]:.1f}")
        if os.getloadavg()[0] > 0.5:
            print("  other processes are running: with 2+ threads on busy cores every parallel op can stall on a "
                  "descheduled thread, which punishes many small ops far more than one big kernel; "
                  "--threads 1 compares more fairly there")
    else:
        print(f"bandwidth references: spec-sheet peak {fmt(peak, '.0f')} GB/s "
              f"({'--peak-gbs' if args.peak_gbs else 'table by device name'}), measured device-to-device copy "
              f"{copy:.0f} GB/s")
        if peak is None:
            print(f"no peak bandwidth known for {name!r}: pass --peak-gbs to get GEMV % of peak")
    if triton_available(args.device) and cpu:
        print("TRITON_INTERPRET=1: the Triton column runs in the interpreter (slow: use --shapes tiny)")
    print_header(args.device)
    load_before = os.getloadavg()[0]
    rows = []
    for n in names:
        for proj, N, K in SHAPES[n]:
            rows += bench_shape(proj, N, K, ms, args.device, args.reps, args.warmup, peak, copy)
    judged = targets(rows, args.device)
    print("targets:")
    for k, ok in judged.items():
        print(f"  {'met    ' if ok else 'NOT met'}  {k}")
    import bitsandbytes
    import triton
    result = {"device": args.device, "device_name": name, "dtype": "bfloat16", "shapes": names, "ms": ms,
              "reps": args.reps if cpu else "do_bench", "peak_gbs": peak,
              "peak_source": "--peak-gbs" if args.peak_gbs else ("spec table by device name" if peak else None),
              "copy_gbs": copy, "torch": torch.__version__,
              "triton": triton.__version__, "bitsandbytes": bitsandbytes.__version__,
              "threads": torch.get_num_threads(), "load_avg_before": load_before,
              "load_avg_after": os.getloadavg()[0], "rows": rows, "targets": judged}
    out = Path(args.out_dir) / f"bench_nf4_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
