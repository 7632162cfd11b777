"""Peak CPU memory of a training step with each memory lever on or off.

    python benchmarks/bench_memory.py [--dim 1024] [--layers 8] [--seq-len 1024] [--batch-size 2] [--steps 2]

A mid-size Llama (dim 1024, 8 layers, 16 heads, vocab 32000, ~168M parameters, on CPU) trains --steps
optimizer steps on random tokens (rows packed with 4 documents each, cut at new random places every step as
packed chats are; every token trained on) with the levers train.py offers:

- chunked cross-entropy: `llama.ops.head_ce` (what `model(tokens, doc_ids, labels=)` runs) (the trained tokens' logits 1024 rows at a time, their gradient
  taken in the forward, so no chunk is kept or recomputed) against the plain baseline
  `F.cross_entropy(model(tokens).float(), labels)`, which holds the [B*T, 32000] fp32 logits, their
  log-softmax and their gradient at once;
- gradient checkpointing (`--grad-checkpointing`): each block's activations recomputed in backward;
- 8-bit AdamW state (`--optim adamw_8bit`, bitsandbytes): moments in 8 bits instead of fp32.

LoRA (r 16 on all seven projections, train.py's defaults) for the first lever pair, and full fine-tuning
for the optimizer, where optimizer state is large enough to matter. Every configuration is fp32 except
"lora: chunked CE, bf16": the same step as "lora: chunked CE" with the weights in bf16, as train.py runs on a
CPU with native bf16 (`--dtype auto` there). Its packed attention pads each document to a multiple of
`llama.ops.PAD_TO` rows; `--pad-to 1` runs it without the padding, to show what the padding saves over
several steps of new document lengths (`--steps 8`).

Measure: every configuration runs in a fresh subprocess. Its resident set is read from /proc/self/status:
`model` = VmRSS after the model (and LoRA, optimizer object) is built, `peak` = VmHWM over the training
steps (the high-water mark is reset through /proc/self/clear_refs just before the first step), and `step
peak` = peak - model, what training adds on top of the weights. This is the operating system's view
(allocator caches included), not torch's allocator statistics. Prints a table and writes
results/bench_memory.json.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name -> (mode, chunked CE, grad checkpointing, optimizer, dtype)
CONFIGS = {
    "lora: none": ("lora", False, False, "adamw", "fp32"),
    "lora: chunked CE": ("lora", True, False, "adamw", "fp32"),
    "lora: grad checkpointing": ("lora", False, True, "adamw", "fp32"),
    "lora: 8-bit AdamW": ("lora", False, False, "adamw_8bit", "fp32"),
    "lora: all three": ("lora", True, True, "adamw_8bit", "fp32"),
    "full: none, AdamW": ("full", False, False, "adamw", "fp32"),
    "full: chunked CE + ckpt, AdamW": ("full", True, True, "adamw", "fp32"),
    "full: chunked CE + ckpt, 8-bit AdamW": ("full", True, True, "adamw_8bit", "fp32"),
    "lora: chunked CE, bf16": ("lora", True, False, "adamw", "bf16"),
}


def _status(key: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def run_one(name: str, a) -> dict:
    """One configuration, in this (fresh) process."""
    import torch
    import torch.nn.functional as F
    sys.path.insert(0, str(ROOT))
    import lora
    import train
    from llama import ModelArgs, Transformer
    from llama.ops import head_ce

    from llama import ops

    mode, chunked, ckpt, optim, dtype = CONFIGS[name]
    ops.PAD_TO = a.pad_to or ops.PAD_TO
    torch.manual_seed(0)
    args = ModelArgs(dim=a.dim, n_layers=a.layers, n_heads=a.dim // 64, vocab_size=32000, max_seq_len=a.seq_len)
    model = Transformer(args)
    model.init_rope("cpu")
    with torch.no_grad():  # the default init of nn.Linear/Embedding is fine; scale the head so the loss is ~log V
        model.output.weight.mul_(0.1)
    model.to({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])  # as train.py on CPU: the weights, no autocast
    model.grad_checkpointing = ckpt
    if mode == "lora":
        for p in model.parameters():
            p.requires_grad_(False)
        lora.apply_lora(model, r=16, alpha=32, dropout=0.05, targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3"))
    params = [p for p in model.parameters() if p.requires_grad]
    cfg = train.TrainConfig(optim=optim)
    opt = train.make_optimizer(cfg, params, torch.device("cpu"))
    model.train()

    B, T = a.batch_size, a.seq_len
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 32000, (B, T), generator=g)
    labels = torch.roll(tokens, -1, 1)
    labels[:, -1] = -100
    n_target = int((labels != -100).sum())

    def loss_fn():
        # 4 packed documents per row, cut at random places each step, as packed chats are: every step meets new
        # document lengths (what a CPU's per-length kernels see in a real run)
        cuts = torch.sort(torch.randint(1, T, (B, 3), generator=g), dim=1).values
        doc_ids = (torch.arange(T)[None, None, :] >= cuts[:, :, None]).sum(1)
        if chunked:
            h = model(tokens, doc_ids, return_hidden=True)
            return head_ce(h.flatten(0, 1), model.output.weight, labels.flatten(), chunk=a.chunk)
        logits = model(tokens, doc_ids)  # (B, T, vocab): the whole thing, then an fp32 copy for the loss
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")

    rss_model = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    times, losses = [], []
    for _ in range(a.steps):
        t0 = time.time()
        loss = loss_fn() / n_target
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.time() - t0)
        losses.append(loss.item())
    peak = _status("VmHWM")
    opt_bytes = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    return {"config": name, "mode": mode, "dtype": dtype, "sdpa_pad_to": ops.PAD_TO, "chunked_ce": chunked, "grad_checkpointing": ckpt, "optim": optim,
            "trainable_params": sum(p.numel() for p in params), "total_params": sum(p.numel() for p in model.parameters()),
            "model_mb": round(rss_model / 2**20, 1), "peak_mb": round(peak / 2**20, 1),
            "step_peak_mb": round((peak - rss_model) / 2**20, 1), "optimizer_state_mb": round(opt_bytes / 2**20, 1),
            "s_per_step": round(min(times[1:] or times), 2), "losses": [round(x, 4) for x in losses]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--chunk", type=int, default=1024, help="tokens per cross-entropy chunk (llama.ops.head_ce)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--pad-to", type=int, default=0, help="llama.ops.PAD_TO for bf16 attention (1: no padding; "
                   "default: the product's)")
    p.add_argument("--only", nargs="*", default=None, help="a subset of the configuration names")
    p.add_argument("--run", help=argparse.SUPPRESS)  # internal: run one configuration in this process
    p.add_argument("--out", default=str(ROOT / "results" / "bench_memory.json"))
    a = p.parse_args()
    if a.run:
        print(json.dumps(run_one(a.run, a)))
        return 0

    rows = []
    for name in a.only or CONFIGS:
        cmd = [sys.executable, __file__, "--run", name, "--dim", str(a.dim), "--layers", str(a.layers), "--seq-len",
               str(a.seq_len), "--batch-size", str(a.batch_size), "--chunk", str(a.chunk), "--steps", str(a.steps),
               "--pad-to", str(a.pad_to)]
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if r.returncode != 0:
            print(r.stderr[-3000:], file=sys.stderr)
            return 1
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        x = rows[-1]
        print(f"{name:<40} model {x['model_mb']:>7.0f} MB  peak {x['peak_mb']:>7.0f} MB  step peak "
              f"{x['step_peak_mb']:>7.0f} MB  opt state {x['optimizer_state_mb']:>6.1f} MB  {x['s_per_step']:>6.2f} s/step",
              flush=True)

    shape = {"dim": a.dim, "layers": a.layers, "n_heads": a.dim // 64, "vocab": 32000, "seq_len": a.seq_len,
             "batch_size": a.batch_size, "ce_chunk": a.chunk, "steps": a.steps, "device": "cpu"}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"shape": shape, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                                       "measure": "peak RSS (VmHWM) of a fresh process per configuration",
                                       "rows": rows}, indent=2))
    print(f"\n| configuration | model RSS (MB) | peak RSS (MB) | step peak above model (MB) | optimizer state (MB) | s/step |")
    print("|---|---:|---:|---:|---:|---:|")
    for x in rows:
        print(f"| {x['config']} | {x['model_mb']:.0f} | {x['peak_mb']:.0f} | {x['step_peak_mb']:.0f} | "
              f"{x['optimizer_state_mb']:.1f} | {x['s_per_step']:.1f} |")
    print(f"\nwritten to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
