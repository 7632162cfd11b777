"""One LoRA layer over an NF4 weight, forward + backward: ours vs PEFT on bitsandbytes' Linear4bit.

    python benchmarks/bench_lora.py [--device cpu|cuda] [--reps 5] [--tokens 512 4096]

At Llama-2-7B shapes (4096 -> 4096: q/k/v/o, 4096 -> 11008: gate/up; r 16, alpha 32, dropout
0.05, bf16 compute under autocast as the HF Trainer runs QLoRA) it times one step
`y = layer(x); y.backward(dy)` for four layers built from the same dense weight:

- ours:      lora.LoRALinear on quant.NF4Linear -- our whole stack;
- ours_bnb:  lora.LoRALinear on bitsandbytes.nn.Linear4bit -- our LoRA code on PEFT's base, so
             that the comparison with peft isolates the LoRA layer from the NF4 kernel;
- plain_bnb: `base(x) + s * F.linear(F.linear(F.dropout(x), A), B)` in plain autograd on the same
             bnb base: what the fused autograd Function buys;
- peft:      peft's LoRA on bitsandbytes.nn.Linear4bit (what transformers + peft + bnb run);
- base_ours, base_bnb: quant.NF4Linear / bnb Linear4bit alone, no adapter (x still gets its gradient):
             the floor under any LoRA layer on that base. peft_ms / base_bnb_ms is the most that any
             LoRA code over bitsandbytes' base could gain on peft ("bound" in the table).

Runs alternate between the layers, after warm-up; the median of --reps is reported.

Memory, two measures per layer:
- saved: bytes autograd keeps for the backward (torch.autograd.graph.saved_tensors_hooks), over
  distinct storages, not counting the layer's own parameters/buffers (those live anyway). The
  input x is counted when saved (ours saves x itself, which q, k and v share in a real block).
- peak: on CUDA, torch.cuda.max_memory_allocated() during the step minus what was allocated
  before it; on CPU, the peak resident set (VmHWM, reset through /proc/self/clear_refs) during the
  step minus the RSS before it, each layer in a fresh subprocess so allocator caches don't mix.
Table printed and written to results/bench_lora_<device>.json.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lora  # noqa: E402
import quant  # noqa: E402

R, ALPHA, DROPOUT = 16, 32, 0.05
IMPLS = ("ours", "ours_bnb", "plain_bnb", "peft", "base_ours", "base_bnb")


class PlainLoRA(nn.Module):
    """The textbook composition in plain autograd: base(x) + s * B(A(dropout(x)))."""

    def __init__(self, base: nn.Module, A: torch.Tensor, B: torch.Tensor):
        super().__init__()
        self.base, self.A, self.B = base, nn.Parameter(A.clone()), nn.Parameter(B.clone())

    def forward(self, x):
        return self.base(x) + (ALPHA / R) * F.linear(F.linear(F.dropout(x, DROPOUT, self.training), self.A), self.B)


def bnb_linear4bit(dense: nn.Linear, device: str, dtype: torch.dtype) -> nn.Module:
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=False, compute_dtype=dtype, quant_type="nf4",
                          compress_statistics=True)
    q.weight = bnb.nn.Params4bit(dense.weight.data.cpu(), requires_grad=False, quant_type="nf4",
                                 compress_statistics=True)
    return q.to(device)  # quantizes


def build(impl: str, n_in: int, n_out: int, device: str, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    dense = nn.Linear(n_in, n_out, bias=False, device=device, dtype=dtype)
    if impl == "ours":
        layer = lora.LoRALinear(quant.NF4Linear.from_linear(dense), R, ALPHA, DROPOUT)
    elif impl == "base_ours":
        layer = quant.NF4Linear.from_linear(dense)
    elif impl == "base_bnb":
        layer = bnb_linear4bit(dense, device, dtype)
    elif impl == "ours_bnb":  # LoRALinear duck-types over bitsandbytes' layer too
        layer = lora.LoRALinear(bnb_linear4bit(dense, device, dtype), R, ALPHA, DROPOUT)
    elif impl == "plain_bnb":
        A = torch.empty(R, n_in, device=device)
        nn.init.kaiming_uniform_(A, a=5**0.5)
        layer = PlainLoRA(bnb_linear4bit(dense, device, dtype), A, torch.zeros(n_out, R, device=device))
    else:
        from peft import LoraConfig, get_peft_model

        q = bnb_linear4bit(dense, device, dtype)

        class Wrapper(nn.Module):
            is_loaded_in_4bit = True  # makes peft dispatch its bnb Linear4bit LoRA layer

            def __init__(self):
                super().__init__()
                self.proj = q

            def forward(self, x):
                return self.proj(x)

        layer = get_peft_model(Wrapper(), LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT,
                                                     target_modules=["proj"]))
        assert type(layer.base_model.model.proj).__module__ == "peft.tuners.lora.bnb", type(layer.base_model.model.proj)
    del dense
    return layer.train()


def step(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> None:
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        y = layer(x)
    y.backward(dy)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def saved_bytes(layer: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(bytes saved for backward over distinct storages excluding the layer's own tensors, of which x)."""
    own = {t.untyped_storage().data_ptr() for t in [*layer.parameters(), *layer.buffers()]}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in own:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast(x.device.type, dtype=torch.bfloat16):
        y = layer(x)
    del y
    return sum(seen.values()), seen.get(x.untyped_storage().data_ptr(), 0)


def _proc_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_bytes(impl: str, n_in: int, n_out: int, tokens: int, device: str) -> int:
    """Peak extra memory of one step (see the module docstring)."""
    if device == "cuda":
        layer, x, dy = setup(impl, n_in, n_out, tokens, device)
        step(layer, x, dy)  # warm-up: cuBLAS workspaces etc. are not the layer's
        x.grad = None
        for p in layer.parameters():
            p.grad = None
        sync(device)
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(layer, x, dy)
        sync(device)
        return torch.cuda.max_memory_allocated() - before
    out = subprocess.run([sys.executable, __file__, "--child", f"{impl},{n_in},{n_out},{tokens}"],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def child(spec: str) -> None:
    impl, n_in, n_out, tokens = spec.split(",")
    layer, x, dy = setup(impl, int(n_in), int(n_out), int(tokens), "cpu")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _proc_kib("VmRSS")
    step(layer, x, dy)
    print((_proc_kib("VmHWM") - before) * 1024)


def setup(impl: str, n_in: int, n_out: int, tokens: int, device: str):
    layer = build(impl, n_in, n_out, device, torch.bfloat16)
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(tokens, n_in, device=device, dtype=torch.bfloat16, generator=g).requires_grad_()
    dy = torch.randn(tokens, n_out, device=device, dtype=torch.bfloat16, generator=g)
    return layer, x, dy


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--reps", type=int, default=None, help="timed steps per layer (default 10 cuda, 5 cpu)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 4096])
    ap.add_argument("--shapes", default="4096x4096,4096x11008")
    ap.add_argument("--no-peak", action="store_true", help="skip the peak-memory measurement")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child)
        return {}
    reps = args.reps or (10 if args.device == "cuda" else 5)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    rows = []
    for n_in, n_out in shapes:
        for tokens in args.tokens:
            layers = {}
            for impl in IMPLS:
                layers[impl] = setup(impl, n_in, n_out, tokens, args.device)
            times = {impl: [] for impl in IMPLS}
            for i in range(args.warmup + reps):
                for impl in IMPLS:  # alternate, so drift in clocks/thermals hits all alike
                    layer, x, dy = layers[impl]
                    x.grad = None
                    sync(args.device)
                    t0 = time.perf_counter()
                    step(layer, x, dy)
                    sync(args.device)
                    if i >= args.warmup:
                        times[impl].append(time.perf_counter() - t0)
            row = {"shape": f"{n_in}x{n_out}", "tokens": tokens, "r": R}
            for impl in IMPLS:
                layer, x, _ = layers[impl]
                row[f"{impl}_ms"] = 1e3 * statistics.median(times[impl])
                row[f"{impl}_saved_bytes"], row[f"{impl}_saved_x_bytes"] = saved_bytes(layer, x)
            del layers
            if not args.no_peak:
                for impl in IMPLS:
                    row[f"{impl}_peak_bytes"] = peak_bytes(impl, n_in, n_out, tokens, args.device)
            row["speedup_vs_peft"] = row["peft_ms"] / row["ours_ms"]  # whole stack: our LoRA + our NF4
            row["speedup_vs_peft_same_base"] = row["peft_ms"] / row["ours_bnb_ms"]  # LoRA code alone
            row["speedup_fused_vs_plain"] = row["plain_bnb_ms"] / row["ours_bnb_ms"]
            row["bound_vs_peft"] = row["peft_ms"] / row["base_bnb_ms"]  # a LoRA that cost nothing, on bnb's base
            row["ours_lora_ms"] = row["ours_ms"] - row["base_ours_ms"]  # what the adapter adds, each stack
            row["peft_lora_ms"] = row["peft_ms"] - row["base_bnb_ms"]
            for impl in ("ours", "ours_bnb"):
                row[f"{impl}_saved_ratio_vs_peft"] = row[f"{impl}_saved_bytes"] / row["peft_saved_bytes"]
                if not args.no_peak:
                    row[f"{impl}_peak_ratio_vs_peft"] = row[f"{impl}_peak_bytes"] / row["peft_peak_bytes"]
            rows.append(row)
            print_row(row, header=len(rows) == 1)
    result = {"device": args.device, "device_name": device_name(args.device), "dtype": "bf16 (autocast)",
              "r": R, "alpha": ALPHA, "dropout": DROPOUT, "reps": reps, "warmup": args.warmup,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}
    out = ROOT / "results" / f"bench_lora_{args.device}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    for line in Path("/proc/cpuinfo").read_text().splitlines() if os.path.exists("/proc/cpuinfo") else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip() + f" ({torch.get_num_threads()} threads)"
    return "cpu"


def print_row(row: dict, header: bool) -> None:
    mib = lambda key: f"{row[key] / 2**20:.0f}" if key in row else "-"  # noqa: E731
    if header:
        print("ms and MiB per step; ours = LoRALinear on quant.NF4Linear, ours_bnb / plain_bnb = LoRALinear / "
              "plain-autograd LoRA on bnb Linear4bit, peft = peft on bnb Linear4bit")
        print("base_ours / base_bnb = the NF4 layer alone; bound = peft / base_bnb, the most any LoRA over bnb's "
              "base could gain")
        print(f"{'shape':>10} {'tokens':>6} | {'ours':>7} {'ours_bnb':>8} {'plain_bnb':>9} {'peft':>7} "
              f"{'base_ours':>9} {'base_bnb':>8} | {'x peft':>6} {'x peft same base':>16} {'bound':>6} | "
              f"{'saved ours/peft':>15} | {'peak ours/peft':>14}")
    ms = " ".join(f"{row[f'{i}_ms']:{w}.1f}" for i, w in zip(IMPLS, (7, 8, 9, 7, 9, 8)))
    saved = "/".join(mib(f"{i}_saved_bytes") for i in ("ours", "peft"))
    peak = "/".join(mib(f"{i}_peak_bytes") for i in ("ours", "peft"))
    print(f"{row['shape']:>10} {row['tokens']:>6} | {ms} | {row['speedup_vs_peft']:5.2f}x "
          f"{row['speedup_vs_peft_same_base']:15.2f}x {row['bound_vs_peft']:5.2f}x | {saved:>15} | {peak:>14}",
          flush=True)


if __name__ == "__main__":
    main()
