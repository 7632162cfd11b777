"""Supervised fine-tuning of Llama 2 on chat data: full, LoRA or QLoRA, in one file.

Read top to bottom, it is the pipeline:

    data files -> messages -> chat template -> (ids, mask) -> pack into rows of --seq-len
    -> model (Meta checkpoint -> NF4 quantize while loading -> LoRA) -> AdamW steps
    -> eval -> checkpoints -> PEFT adapter (and optionally a merged model)

The loss is next-token cross-entropy on assistant tokens only, averaged over every trained token of
an optimizer step (all micro-batches together), so gradient accumulation and packing do not change
what is optimised: a packed batch gives the same loss as its documents run one by one.

    python train.py                                 # the bundled demo: QLoRA on a tiny Llama, CPU
    python train.py --ckpt llama-2-7b --data chats.jsonl --quant nf4
    python train.py --chat --ckpt llama-2-7b --adapter out/run/adapter
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from bisect import bisect_left, insort
from dataclasses import dataclass, field
from pathlib import Path

# Process settings for CPU runs, read by MKL and c10 at their first use, hence set before torch is imported
# (an explicit value in the environment wins; benchmarks/bench_train.py gives the HF baseline the same):
# - MKL_CBWR: Intel's MKL chooses its summation order by the memory alignment of the operands, so a resumed
#   run (another process, another heap layout) drifted from the uninterrupted one in the last bits of fp32
#   losses. Strict conditional numerical reproducibility fixes the order for a given thread count; no
#   measurable cost on the matmuls here.
# - THP_MEM_ALLOC_ENABLE: each fresh CPU tensor is faulted in 4 KiB pages, ~2.5 us each on a VM, so a 16 MB
#   activation cost more to map than to compute (silu on [2048, 2048]: 8.5 ms, 2 ms of it arithmetic).
#   With this, c10 backs allocations of 2 MB and up with transparent huge pages (Linux, where THP is
#   "madvise" or "always"): ~20% more tokens/s in the small model's LoRA step. No effect on CUDA memory.
PROCESS_ENV = {"MKL_CBWR": "AUTO,STRICT", "THP_MEM_ALLOC_ENABLE": "1"}
for _k, _v in PROCESS_ENV.items():
    os.environ.setdefault(_k, _v)

import numpy as np
import torch
import torch.nn.functional as F

import lora
import quant
from llama import Tokenizer, load_model, save_model
from llama.chat import TEMPLATES, encode_chat, required_special_tokens, stop_ids
from llama.checkpoint import CheckpointError, find_tokenizer, resolve_checkpoint
from llama.generate import generate
from llama.model import resize_embeddings

ROOT = Path(__file__).resolve().parent
DEMO = ROOT / "demo"


# ---------------------------------------------------------------------------------------------
# Configuration: the dataclass defaults are the documentation; the CLI is generated from it.


@dataclass
class TrainConfig:
    ckpt: str = str(DEMO / "tiny-llama")  # Meta folder (consolidated.*.pth + params.json), HF folder, or org/name in the HF hub cache
    data: list[str] = field(default_factory=lambda: [str(DEMO / "data" / "train.jsonl")])  # path[:fraction] ...
    template: str = "llama2"  # llama2 | chatml | tulu | oasst | alpaca
    out: str = "out/run"
    overwrite: bool = False  # reuse an --out that holds another run
    # model
    quant: str = "auto"  # none | nf4 | auto (nf4 on CUDA, none on CPU)
    full: bool = False  # full fine-tuning instead of LoRA
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_targets: str = "wq,wk,wv,wo,w1,w2,w3"
    rslora: bool = False
    dtype: str = "auto"  # auto (bf16 on CUDA; on CPU fp32, bf16 for checkpoints over 2 GiB) | bf16 | fp16 | fp32
    device: str = "auto"
    grad_checkpointing: bool = False
    lima_dropout: float = 0.0  # residual dropout rising linearly with depth up to this value (LIMA)
    init_adapter: str = ""  # start from a saved adapter (second stage), fresh optimizer
    # data
    seq_len: int = 1024
    packing: bool = True
    overlong: str = "truncate"  # truncate | drop samples longer than --seq-len
    val_split: float = 0.0  # fraction of each file held out for eval
    max_val: int = 1000  # cap on held-out samples per file
    min_assistant_tokens: int = 1  # drop samples with fewer trained tokens
    # optimisation
    batch_size: int = 4  # rows per micro-batch
    grad_accum: int = 4  # micro-batches per optimizer step
    epochs: float = 1.0
    max_steps: int = 0  # > 0 overrides --epochs
    lr: float = 2e-4
    min_lr: float = 0.0
    schedule: str = "cosine"  # cosine | linear | constant
    warmup_ratio: float = 0.05
    warmup_steps: int = 0  # > 0 overrides --warmup-ratio
    optim: str = "adamw"  # adamw | adamw_8bit | paged_adamw_8bit
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 0.3  # 0 disables clipping
    max_bad_steps: int = 5  # abort after this many non-finite steps in a row
    seed: int = 0
    # logging, eval, checkpoints
    log_every: int = 1
    eval_every: int = 0  # 0: eval only at the end (when there is a val split)
    save_every: int = 0  # 0: no intermediate checkpoints
    save_total_limit: int = 2
    resume: bool = False
    merge: bool = False  # also write the merged model to OUT/merged
    merge_layout: str = "hf"  # meta | hf
    gen_eval: str = ""  # JSONL of dialogs whose last assistant turn is the expected answer
    # chat with a result instead of training
    chat: bool = False
    adapter: str = ""


CHOICES = {"template": TEMPLATES, "quant": ("none", "nf4", "auto"), "dtype": ("auto", "bf16", "fp16", "fp32"),
           "overlong": ("truncate", "drop"), "schedule": ("cosine", "linear", "constant"),
           "optim": ("adamw", "adamw_8bit", "paged_adamw_8bit"), "merge_layout": ("meta", "hf")}


def _field_help() -> dict[str, str]:
    """The comment after each TrainConfig field becomes its --help text (one place to document a flag)."""
    import inspect
    import re
    src = inspect.getsource(TrainConfig)
    return {m.group(1): m.group(2) for m in re.finditer(r"^\s+(\w+): [^\n]*?  # (.*)$", src, re.M)}


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Build the CLI from TrainConfig: `--lora-r 8`, `--no-packing`, `--data a.jsonl b.jsonl:0.5`."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    helps = _field_help()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        h = helps.get(f.name, "")
        if f.type == "bool" and default:
            p.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false", help=h)
        elif f.type == "bool":
            p.add_argument(flag, action="store_true", help=h)
        elif f.type.startswith("list"):
            p.add_argument(flag, nargs="+", default=default, help=f"{h} (default: %(default)s)")
        else:
            p.add_argument(flag, type={"int": int, "float": float, "str": str}[f.type], default=default,
                           choices=CHOICES.get(f.name), help=f"{h} (default: %(default)s)".lstrip())
    return TrainConfig(**vars(p.parse_args(argv)))


class UserError(Exception):
    """Bad input from the user: printed as one paragraph, exit code 2, no traceback."""


# ---------------------------------------------------------------------------------------------
# Data: files -> messages. Formats are detected per row and must agree within a file.

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def read_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) for a .jsonl file (one object per line) or a .json array."""
    if not path.exists():
        raise UserError(f"data file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); expected a JSON array of objects")
        return [(i + 1, r) for i, r in enumerate(rows)]  # "line" is the array index + 1 here
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno}); "
                            "expected one JSON object per line")
    return out


def to_messages(row, where: str) -> list[dict]:
    """One row in any supported format -> [{"role", "content"}, ...]."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        msgs = row["messages"]
    elif "conversations" in row:  # ShareGPT
        msgs = []
        for turn in row["conversations"] if isinstance(row["conversations"], list) else [None]:
            if not isinstance(turn, dict) or turn.get("from") not in SHAREGPT_ROLES:
                raise UserError(f"{where}: ShareGPT turn {turn!r} has no known 'from' "
                                f"(expected one of {sorted(SHAREGPT_ROLES)})")
            msgs.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn.get("value")})
    elif "instruction" in row and "output" in row:  # Alpaca: the input, when present, follows the instruction
        user = {"role": "user", "content": row["instruction"]}
        if row.get("input"):
            user["input"] = row["input"]
        msgs = [user, {"role": "assistant", "content": row["output"]}]
    else:
        raise UserError(f"{where}: row has no recognisable format; expected {{\"messages\": [...]}}, "
                        "Alpaca {\"instruction\", \"input\", \"output\"} or ShareGPT {\"conversations\": [...]}; "
                        f"found keys {sorted(row)}")
    if not isinstance(msgs, list) or not msgs:
        raise UserError(f"{where}: the dialog is empty")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise UserError(f"{where}: message {i} has role {m.get('role') if isinstance(m, dict) else m!r}; "
                            "expected system, user or assistant")
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            raise UserError(f"{where}: message {i} ({m['role']}) has empty or non-text content")
    return msgs


def parse_data_spec(spec: str) -> tuple[Path, float]:
    """`path` or `path:fraction` (the share of that file to use, as in dataset mixes)."""
    path, _, frac = spec.rpartition(":")
    if path and frac.replace(".", "", 1).isdigit():
        fraction = float(frac)
        if not 0 < fraction <= 1:
            raise UserError(f"--data {spec}: fraction must be in (0, 1], got {fraction}")
        return Path(path), fraction
    return Path(spec), 1.0


def tokenize(tokenizer: Tokenizer, msgs: list[dict], cfg: TrainConfig, where: str) -> tuple[list[int], list[bool]] | str:
    """(ids, mask) for one dialog, or the reason it was skipped."""
    try:
        ids, mask = encode_chat(tokenizer, msgs, cfg.template)
    except ValueError as e:
        raise UserError(f"{where}: {e}")
    if len(ids) > cfg.seq_len:
        if cfg.overlong == "drop":
            return "overlong"
        ids, mask = ids[: cfg.seq_len], mask[: cfg.seq_len]
    if sum(mask) < max(cfg.min_assistant_tokens, 1):
        return "too_few_assistant_tokens"
    return ids, mask


def load_data(cfg: TrainConfig, tokenizer: Tokenizer) -> tuple[list, list, dict]:
    """Train and val samples [(ids, mask)], plus per-file statistics."""
    rng = random.Random(cfg.seed)
    train, val, stats = [], [], {"files": {}}
    for spec in cfg.data:
        path, fraction = parse_data_spec(spec)
        rows = read_rows(path)
        rows = [(n, to_messages(r, f"{path}:{n}")) for n, r in rows]
        rng.shuffle(rows)
        rows = rows[: max(1, round(len(rows) * fraction))] if rows else rows
        n_val = min(cfg.max_val, int(len(rows) * cfg.val_split))
        s = {"rows": len(rows), "accepted": 0, "val": 0, "skipped": {}, "truncated": 0, "tokens": 0,
             "trained_tokens": 0, "min_tokens": None, "max_tokens": 0}
        for i, (n, msgs) in enumerate(rows):
            r = tokenize(tokenizer, msgs, cfg, f"{path}:{n}")
            if isinstance(r, str):
                s["skipped"][r] = s["skipped"].get(r, 0) + 1
                continue
            ids, mask = r
            full_len = len(encode_chat(tokenizer, msgs, cfg.template)[0])
            s["truncated"] += full_len > len(ids)
            (val if i < n_val else train).append((ids, mask))
            s["val" if i < n_val else "accepted"] += 1
            s["tokens"] += len(ids)
            s["trained_tokens"] += sum(mask)
            s["min_tokens"] = len(ids) if s["min_tokens"] is None else min(s["min_tokens"], len(ids))
            s["max_tokens"] = max(s["max_tokens"], len(ids))
        kept = s["accepted"] + s["val"]
        s["mean_tokens"] = round(s["tokens"] / kept, 1) if kept else 0
        stats["files"][str(path)] = s
    files = list(stats["files"].values())
    total = {k: sum(f[k] for f in files) for k in ("rows", "accepted", "val", "truncated", "tokens", "trained_tokens")}
    total["skipped"] = {}
    for f in files:
        for why, n in f["skipped"].items():
            total["skipped"][why] = total["skipped"].get(why, 0) + n
    lens = [f["min_tokens"] for f in files if f["min_tokens"] is not None]
    total["min_tokens"], total["max_tokens"] = (min(lens) if lens else None), max(f["max_tokens"] for f in files)
    kept = total["accepted"] + total["val"]
    total["mean_tokens"] = round(total["tokens"] / kept, 1) if kept else 0
    stats["total"] = total
    if not train:
        raise UserError(f"no training samples left after filtering ({json.dumps(stats['files'])})")
    return train, val, stats


# ---------------------------------------------------------------------------------------------
# Packing: samples -> rows of exactly seq_len tokens with labels and document ids.


def sample_labels(ids: list[int], mask: list[bool]) -> list[int]:
    """Next-token targets: label[i] = ids[i+1] where token i+1 is trained on, else -100."""
    return [ids[i + 1] if mask[i + 1] else -100 for i in range(len(ids) - 1)] + [-100]


def pack(samples: list[tuple[list[int], list[bool]]], seq_len: int, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Best-fit-decreasing bin packing of samples into rows of seq_len tokens.

    Returns tokens/labels/doc_ids [R, seq_len]. Each sample keeps its own doc id within the row so the
    model isolates it; the padded tail is one more "document" whose labels are all -100.
    """
    order = sorted(range(len(samples)), key=lambda i: -len(samples[i][0]))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted, for best fit by bisection
    for i in order:
        n = len(samples[i][0])
        assert n <= seq_len, "samples are truncated or dropped before packing"
        j = bisect_left(free, (n, -1))
        if j == len(free):
            rows.append([i])
            room, r = seq_len - n, len(rows) - 1
        else:
            room, r = free.pop(j)
            rows[r].append(i)
            room -= n
        if room > 0:
            insort(free, (room, r))
    return _rows_to_tensors([[samples[i] for i in row] for row in rows], seq_len, pad_id)


def pad_each(samples: list[tuple[list[int], list[bool]]], seq_len: int, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """--no-packing: one sample per row, padded to seq_len."""
    return _rows_to_tensors([[s] for s in samples], seq_len, pad_id)


def _rows_to_tensors(rows: list[list[tuple[list[int], list[bool]]]], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    tokens = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), seq_len), -100, dtype=torch.long)
    doc_ids = torch.empty((len(rows), seq_len), dtype=torch.long)
    for r, row in enumerate(rows):
        t = 0
        for d, (ids, mask) in enumerate(row):
            tokens[r, t: t + len(ids)] = torch.tensor(ids)
            labels[r, t: t + len(ids)] = torch.tensor(sample_labels(ids, mask))
            doc_ids[r, t: t + len(ids)] = d
            t += len(ids)
        doc_ids[r, t:] = len(row)  # the padding is its own document
    return {"tokens": tokens, "labels": labels, "doc_ids": doc_ids}


# ---------------------------------------------------------------------------------------------
# Model: load base weights -> quantize (while streaming) -> add tokens -> LoRA.


def resolve_device_dtype(cfg: TrainConfig) -> tuple[torch.device, torch.dtype]:
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    name = cfg.dtype
    if name == "auto":  # bf16 on CUDA; on CPU fp32 (exact, and fast for small models) up to ~1B parameters,
        # then bf16: in fp32, 7B's unquantized embeddings, head and activations would double (24 GB machines)
        weights = [f for f in Path(cfg.ckpt).glob("*") if f.suffix in (".pth", ".safetensors", ".bin")]
        big = sum(f.stat().st_size for f in weights) > 2 * 2**30
        name = "bf16" if device.type == "cuda" or big else "fp32"
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if name not in dtypes:
        raise UserError(f"--dtype {cfg.dtype}: expected auto, bf16, fp16 or fp32")
    return device, dtypes[name]


def load_tokenizer(cfg: TrainConfig) -> tuple[Tokenizer, list[str]]:
    """The checkpoint's tokenizer plus the template's special tokens it lacks (ChatML on a base model)."""
    tok_path = find_tokenizer(cfg.ckpt)
    if tok_path is None:
        raise UserError(f"no tokenizer.model in {cfg.ckpt} or its parent folder")
    tokenizer = Tokenizer(str(tok_path))
    new_tokens = [t for t in required_special_tokens(cfg.template) if t not in tokenizer.special_tokens]
    tokenizer.add_special_tokens(new_tokens)
    return tokenizer, new_tokens


def load_progress():
    """A progress(done, total) callback for load_model: one line rewritten in place on a terminal, a line per
    10% in a log file."""
    t0, tty, shown = time.time(), sys.stdout.isatty(), [-1]

    def progress(done: int, total: int) -> None:
        tenth = 10 * done // total
        if not tty and tenth == shown[0]:
            return
        shown[0] = tenth
        elapsed = time.time() - t0
        print(f"{chr(13) if tty else ''}loading weights: {done}/{total} tensors ({100 * done // total}%), {elapsed:.0f}s, "
              f"ETA {elapsed / done * (total - done):.0f}s   ", end="\n" if not tty or done == total else "", flush=True)
    return progress


def build_model(cfg: TrainConfig, tokenizer: Tokenizer, new_tokens: list[str], device: torch.device,
                dtype: torch.dtype, progress=None):
    """Load base weights -> quantize (while streaming) -> resize for added tokens -> LoRA (or all trainable)."""
    quantize = cfg.quant == "nf4" or (cfg.quant == "auto" and device.type == "cuda" and not cfg.full)
    if cfg.full and quantize:
        raise UserError("--full trains every weight; it cannot be combined with --quant nf4")
    # Weights stream off disk one tensor at a time; with NF4 each projection is quantized as it arrives.
    hook = quant.quantize_on_load(compute_dtype=dtype) if quantize else None
    model = load_model(cfg.ckpt, dtype=dtype, device=device, hook=hook, progress=progress)
    if model.args.max_seq_len < cfg.seq_len:
        raise UserError(f"--seq-len {cfg.seq_len} is longer than the model supports "
                        f"(max_seq_len {model.args.max_seq_len} in {cfg.ckpt})")
    if new_tokens:  # the new rows must train and be saved with the adapter
        resize_embeddings(model, tokenizer.n_words)
    if cfg.lima_dropout:
        n = len(model.layers)
        for i, block in enumerate(model.layers):
            block.resid_dropout = cfg.lima_dropout * i / max(n - 1, 1)
    model.grad_checkpointing = cfg.grad_checkpointing
    if cfg.full:
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        extra = ("tok_embeddings", "output") if new_tokens else ()
        targets = tuple(t.strip() for t in cfg.lora_targets.split(",") if t.strip())
        lora.apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=targets,
                        rslora=cfg.rslora, modules_to_save=extra)
        if cfg.init_adapter:
            lora.load_adapter(model, cfg.init_adapter)
    return model, quantize


# ---------------------------------------------------------------------------------------------
# Loss: only the trained tokens reach the head, and cross-entropy's gradient is taken in the forward pass,
# one chunk of logits at a time, so the fp32 [tokens, vocab] logits never exist at once and are never recomputed.


class _HeadCE(torch.autograd.Function):
    """sum_i CE(h_i @ W.T, y_i) over rows h [n, dim] with labels y [n] (no ignored labels here).

    Cross-entropy is the graph's last op, so its gradient is known before backward starts:
    dL/dlogits = softmax(logits) - onehot(y). Computing it per chunk in the forward gives
    dL/dh = (p - onehot) @ W  [n, dim] and dL/dW = (p - onehot).T @ h  [V, dim] (when W trains) with
    one logits matmul per chunk; a checkpointed loss would compute the logits twice. backward only
    scales the stored gradients by the incoming one (1 / trained tokens)."""

    @staticmethod
    def forward(ctx, h, weight, labels, chunk: int, need_h: bool, need_w: bool):
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        gh = torch.empty_like(h) if need_h else None  # [n, dim]
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None  # [V, dim]
        for s in range(0, h.shape[0], chunk):
            hc, y = h[s: s + chunk], labels[s: s + chunk]
            logits = (hc @ weight.T).float()  # [c, V]; under autocast the matmul runs in the autocast dtype
            logp = torch.log_softmax(logits, dim=-1)  # one fused pass
            del logits
            total -= logp.gather(1, y[:, None]).sum()
            if need_h or need_w:
                p = logp.exp_()  # softmax, in place
                p[torch.arange(len(y), device=y.device), y] -= 1  # - onehot(y)
                p = p.to(hc.dtype)
                if need_h:
                    gh[s: s + chunk] = p @ weight
                if need_w:
                    gw += (p.T @ hc).float()
        ctx.save_for_backward(gh, gw)
        ctx.w_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, g):
        gh, gw = ctx.saved_tensors
        return (gh * g.to(gh.dtype) if gh is not None else None,
                (gw * g).to(ctx.w_dtype) if gw is not None else None, None, None, None, None)


def head_ce(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Sum over rows of h [N, dim] of the cross-entropy of h @ weight.T against labels [N] (-100: ignored)."""
    keep = labels != -100
    h, labels = h[keep], labels[keep]  # the head only sees trained tokens: prompts and padding cost nothing
    grad = torch.is_grad_enabled()
    return _HeadCE.apply(h, weight, labels, chunk, grad and h.requires_grad, grad and weight.requires_grad)


def loss_sum(model, tokens, labels, doc_ids, chunk: int = 1024) -> torch.Tensor:
    """Sum of token losses of a batch (labels already shifted: labels[i] is the target after tokens[i])."""
    h = model(tokens, doc_ids, return_hidden=True)  # (B, T, dim)
    return head_ce(h.flatten(0, 1), model.output.weight, labels.flatten(), chunk)


@torch.no_grad()
def evaluate(model, data: dict[str, torch.Tensor], batch_size: int, device) -> dict:
    model.eval()
    total, count = 0.0, 0
    for s in range(0, len(data["tokens"]), batch_size):
        b = {k: v[s: s + batch_size].to(device) for k, v in data.items()}
        total += loss_sum(model, b["tokens"], b["labels"], b["doc_ids"]).item()
        count += int((b["labels"] != -100).sum())
    model.train()
    loss = total / max(count, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50))}


# ---------------------------------------------------------------------------------------------
# Optimiser and schedule.


def make_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter], device: torch.device):
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.optim == "adamw":
        return torch.optim.AdamW(params, fused=device.type == "cuda", **kw)
    if cfg.optim in ("adamw_8bit", "paged_adamw_8bit"):
        import bitsandbytes as bnb  # paged falls back to unpaged memory off CUDA
        cls = bnb.optim.PagedAdamW8bit if cfg.optim == "paged_adamw_8bit" else bnb.optim.AdamW8bit
        return cls(params, **kw)
    raise UserError(f"--optim {cfg.optim}: expected adamw, adamw_8bit or paged_adamw_8bit")


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine/linear/constant to min_lr."""
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    if cfg.schedule == "cosine":
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "linear":
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * (1 - progress)
    if cfg.schedule == "constant":
        return cfg.lr
    raise UserError(f"--schedule {cfg.schedule}: expected cosine, linear or constant")


# ---------------------------------------------------------------------------------------------
# Checkpoints: trainable weights + optimizer + RNG + position, written to a temp dir then renamed,
# so a crash at any moment leaves the previous checkpoint intact.


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict:
    s = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(out: Path, step: int, model, opt, keep: int, dist_ctx: "Dist") -> Path:
    """OUT/checkpoint-STEP: state.pt (one process, or data-parallel adapters: rank 0 writes), or with FSDP
    every rank's shard through torch.distributed.checkpoint. Written to a temp dir, fsynced, renamed."""
    final, tmp = out / f"checkpoint-{step}", out / f".tmp-checkpoint-{step}"
    if dist_ctx.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist_ctx.barrier()
    if dist_ctx.fsdp:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(tmp / "dcp"))
        torch.save({"step": step, "rng": rng_state()}, tmp / f"rng-rank{dist_ctx.rank}.pt")
    if dist_ctx.rank == 0:
        state = {"step": step, "rng": rng_state()}
        if not dist_ctx.fsdp:
            state.update(model=trainable_state(model), optimizer=opt.state_dict())
        with open(tmp / "state.pt", "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    dist_ctx.barrier()
    if dist_ctx.rank == 0:
        _fsync_dir(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        _fsync_dir(out)
        for old in list_checkpoints(out)[:-keep] if keep > 0 else []:
            shutil.rmtree(out / f"checkpoint-{old}", ignore_errors=True)
    dist_ctx.barrier()
    return final


def load_checkpoint(ck: Path, model, opt, dist_ctx: "Dist") -> int:
    state = torch.load(ck / "state.pt", weights_only=False, map_location="cpu")
    if dist_ctx.fsdp:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        msd, osd = get_state_dict(model, opt)
        sd = {"model": msd, "optimizer": osd}
        dcp.load(sd, checkpoint_id=str(ck / "dcp"))
        set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"])
        set_rng_state(torch.load(ck / f"rng-rank{dist_ctx.rank}.pt", weights_only=False)["rng"])
    else:
        named = dict(model.named_parameters())
        with torch.no_grad():
            for n, t in state["model"].items():
                named[n].copy_(t)
        opt.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
    return state["step"]


def list_checkpoints(out: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if (p / "state.pt").exists())


# ---------------------------------------------------------------------------------------------
# Generation-based eval (the demo's before/after exact match).


def read_gen_eval(path: str) -> list[tuple[list[dict], str]]:
    """Dialogs whose last turn is the expected assistant answer -> (prompt messages, answer)."""
    items = []
    for n, row in read_rows(Path(path)):
        msgs = to_messages(row, f"{path}:{n}")
        if msgs[-1]["role"] != "assistant":
            raise UserError(f"{path}:{n}: the last message must be the expected assistant answer")
        items.append((msgs[:-1], msgs[-1]["content"].strip()))
    return items


@torch.no_grad()
def exact_match(model, tokenizer, items, template: str, device, max_new_tokens: int = 48) -> tuple[float, list[str]]:
    prompts = [encode_chat(tokenizer, m, template, add_generation_prompt=True)[0] for m, _ in items]
    outs = generate(model, prompts, max_new_tokens,
                    stop_ids=stop_ids(tokenizer, template))
    answers = [tokenizer.decode(o).strip() for o in outs]
    score = sum(a == want for a, (_, want) in zip(answers, items)) / max(len(items), 1)
    return score, answers


# ---------------------------------------------------------------------------------------------
# Training loop.


def fmt_mem(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated() / 2**30:.1f}GiB"
    import resource
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f}GiB"  # Linux: KiB


def peak_mem_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def check_out(cfg: TrainConfig) -> Path:
    """Refuse an --out that holds another run unless --resume or --overwrite; creates nothing yet, so a run
    that fails on bad input leaves no half-written folder."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    if out.exists() and any(out.iterdir()) and not (cfg.resume or cfg.overwrite):
        raise UserError(f"--out {out} already holds files"
                        + (" from another run" if (out / "run_config.json").exists() else "")
                        + "; pass --resume to continue it, --overwrite to replace it, or choose another --out")
    return out


def estimate_checkpoint_bytes(params: list[torch.nn.Parameter], cfg: TrainConfig) -> int:
    """Trainable weights (fp32) plus AdamW's two moments (fp32, or ~1 byte each for the 8-bit optimizers)."""
    n = sum(p.numel() for p in params)
    return n * (4 + (2 if "8bit" in cfg.optim else 8)) + (1 << 20)


def check_disk(out: Path, params: list[torch.nn.Parameter], cfg: TrainConfig) -> None:
    need = estimate_checkpoint_bytes(params, cfg) * ((cfg.save_total_limit + 1) if cfg.save_every else 1)
    free = shutil.disk_usage(out if out.exists() else out.parent if out.parent.exists() else Path(".")).free
    if free < need:
        raise UserError(f"--out {out}: {free / 2**30:.2f} GiB free on disk, but {need / 2**30:.2f} GiB are needed "
                        f"({cfg.save_total_limit} checkpoints of {estimate_checkpoint_bytes(params, cfg) / 2**30:.2f} GiB "
                        "plus the final adapter); free space, lower --save-total-limit or choose another --out")


# ---------------------------------------------------------------------------------------------
# Several processes (torchrun): full fine-tuning shards every block with FSDP2; LoRA/QLoRA replicate the
# frozen base and all-reduce the adapters' gradients. Each optimizer step's rows are split across ranks,
# and the loss is normalised by the trained-token count of the whole global batch, so N processes compute
# exactly the gradient one process computes on the same global batch.


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    fsdp: bool = False

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def say(self, *a, **kw) -> None:
        if self.rank == 0:
            print(*a, **kw)


def init_distributed() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Dist(rank=torch.distributed.get_rank(), world=world)


def shard_model(model, dist_ctx: Dist, device: torch.device) -> None:
    """FSDP2: each block's parameters are split across ranks and gathered just in time."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.type, (dist_ctx.world,))
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    dist_ctx.fsdp = True


def all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Data-parallel adapters: sum the gradients of all ranks in one flat buffer (one collective)."""
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    torch.distributed.all_reduce(flat)
    for g, v in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(v.view_as(g))


def full_state_model(model, dist_ctx: Dist):
    """The unsharded model for saving (a collective under FSDP; rank 0 gets a plain Transformer)."""
    if not dist_ctx.fsdp:
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from llama import Transformer
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist_ctx.rank != 0:
        return None
    with torch.device("meta"):
        plain = Transformer(model.args)
    plain.load_state_dict(sd, assign=True)
    plain.init_rope("cpu")
    return plain


# ---------------------------------------------------------------------------------------------
# The loop.


def train(cfg: TrainConfig) -> dict:
    dist_ctx = init_distributed()
    try:
        return _train(cfg, dist_ctx)
    finally:
        if dist_ctx.world > 1:
            torch.distributed.destroy_process_group()


def _train(cfg: TrainConfig, dist_ctx: Dist) -> dict:
    say = dist_ctx.say
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    device, dtype = resolve_device_dtype(cfg)
    if cfg.template not in TEMPLATES:
        raise UserError(f"--template {cfg.template}: expected one of {', '.join(TEMPLATES)}")
    out = check_out(cfg)

    # ---- data first (bad rows fail in seconds), then the model
    tokenizer, new_tokens = load_tokenizer(cfg)
    train_s, val_s, stats = load_data(cfg, tokenizer)
    pad = tokenizer.eos_id
    rows = pack(train_s, cfg.seq_len, pad) if cfg.packing else pad_each(train_s, cfg.seq_len, pad)
    val_rows = (pack(val_s, cfg.seq_len, pad) if cfg.packing else pad_each(val_s, cfg.seq_len, pad)) if val_s else None
    n_tokens = sum(len(s[0]) for s in train_s)
    stats["rows"] = len(rows["tokens"])
    stats["packing_efficiency"] = round(n_tokens / rows["tokens"].numel(), 4)
    stats["padding_fraction"] = round(1 - stats["packing_efficiency"], 4)
    stats["train_samples"], stats["val_samples"] = len(train_s), len(val_s)
    if dist_ctx.rank == 0:
        print_stats(stats)
    t0 = time.time()
    model, quantized = build_model(cfg, tokenizer, new_tokens, device, dtype,
                                   load_progress() if dist_ctx.rank == 0 else None)
    say(f"model: loaded{' + NF4-quantized' if quantized else ''} in {time.time() - t0:.1f}s", flush=True)
    if cfg.full and dist_ctx.world > 1:
        shard_model(model, dist_ctx, device)

    # ---- optimiser and schedule; each optimizer step uses per_step rows, split across ranks
    params = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in params) * (dist_ctx.world if dist_ctx.fsdp else 1)
    n_total = (sum(p.numel() for p in model.parameters()) * dist_ctx.world if dist_ctx.fsdp
               else lora.count_parameters(model)[1])  # an NF4 weight counts as its in * out values, not its bytes
    say(f"trainable params: {n_train:,} of {n_total:,} ({100 * n_train / n_total:.3f}%)"
        + (f"; {dist_ctx.world} processes" if dist_ctx.world > 1 else ""), flush=True)
    opt = make_optimizer(cfg, params, device)
    if dist_ctx.rank == 0:  # everything checked: now OUT may be written
        check_disk(out, params, cfg)
        if cfg.overwrite and not cfg.resume and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
    dist_ctx.barrier()
    per_rank = cfg.batch_size * cfg.grad_accum
    per_step = per_rank * dist_ctx.world
    steps_per_epoch = math.ceil(len(rows["tokens"]) / per_step)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    say("\n".join(summary_lines(cfg, model, quantized, device, dtype, stats, n_tokens, total, per_step, out)), flush=True)

    step = 0
    if cfg.resume and list_checkpoints(out):
        ck = out / f"checkpoint-{list_checkpoints(out)[-1]}"
        step = load_checkpoint(ck, model, opt, dist_ctx)
        say(f"resumed from {ck} at step {step}", flush=True)
    if dist_ctx.rank == 0:
        if cfg.resume and (out / "metrics.jsonl").exists():  # drop lines logged after the checkpoint
            kept = [ln for ln in (out / "metrics.jsonl").read_text().splitlines() if json.loads(ln)["step"] <= step]
            (out / "metrics.jsonl").write_text("".join(ln + "\n" for ln in kept))
        (out / "run_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        (out / "data_stats.json").write_text(json.dumps(stats, indent=2))

    gen_eval = bool(cfg.gen_eval) and not dist_ctx.fsdp  # generation needs the whole model in one process
    before = None
    if gen_eval and step == 0:
        before = exact_match(model, tokenizer, read_gen_eval(cfg.gen_eval), cfg.template, device)

    # ---- loop: step k takes rows [k*per_step, (k+1)*per_step) of its epoch's permutation
    stop = {"signal": None}

    def on_signal(signum, frame):  # finish the step, save a checkpoint, exit
        stop["signal"] = signum
    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    autocast = torch.autocast("cuda", dtype=dtype) if device.type == "cuda" and dtype != torch.float32 \
        else torch.autocast(device.type, enabled=False)
    metrics_f = open(out / "metrics.jsonl", "a") if dist_ctx.rank == 0 else None
    model.train()
    bad_steps, last, t_start = 0, {}, time.time()
    try:
        while step < total:
            t_step = time.time()
            epoch, pos = divmod(step * per_step, steps_per_epoch * per_step)
            perm = torch.randperm(len(rows["tokens"]), generator=torch.Generator().manual_seed(cfg.seed + epoch))
            idx = perm[pos: pos + per_step]
            if len(idx) < per_step:  # the epoch's last step wraps around (as DistributedSampler pads), so every
                idx = torch.cat([idx, perm[: per_step - len(idx)]])  # rank runs the same micro-batches
            n_target = int((rows["labels"][idx] != -100).sum())  # over the global batch, on every rank
            mine = idx[dist_ctx.rank * per_rank: (dist_ctx.rank + 1) * per_rank]
            lr = lr_at(step, total, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            loss_total = torch.zeros((), device=device)
            for m in range(0, len(mine), cfg.batch_size):
                b = {k: v[mine[m: m + cfg.batch_size]].to(device) for k, v in rows.items()}
                with autocast:
                    loss = loss_sum(model, b["tokens"], b["labels"], b["doc_ids"]) / max(n_target, 1)
                # FSDP averages gradients over ranks; our loss is already normalised over the global batch
                (loss * dist_ctx.world if dist_ctx.fsdp else loss).backward()
                loss_total += loss.detach()
            if dist_ctx.world > 1:
                torch.distributed.all_reduce(loss_total)
                if not dist_ctx.fsdp:
                    all_reduce_grads(params)
            loss_total = loss_total.item()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
            grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            if not (math.isfinite(loss_total) and math.isfinite(grad_norm)):
                bad_steps += 1
                opt.zero_grad(set_to_none=True)
                if metrics_f:
                    metrics_f.write(json.dumps({"step": step + 1, "skipped": "non-finite loss or gradient",
                                                "loss": None, "lr": lr}) + "\n")
                    metrics_f.flush()
                say(f"\nstep {step + 1}: non-finite loss/gradient ({loss_total}, {grad_norm}); step skipped "
                    f"({bad_steps}/{cfg.max_bad_steps} in a row)", flush=True)
                if bad_steps >= cfg.max_bad_steps:
                    raise UserError(f"{bad_steps} non-finite steps in a row at step {step + 1}: the run diverged. "
                                    "Lower --lr, use fp32/bf16 instead of fp16, or check the data.")
                step += 1
                continue
            bad_steps = 0
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            dt = time.time() - t_step
            last = {"step": step, "epoch": round(step / steps_per_epoch, 4), "loss": round(loss_total, 6), "lr": lr,
                    "grad_norm": round(grad_norm, 6), "tokens_per_s": round(len(idx) * cfg.seq_len / dt, 1),
                    "peak_mem_mb": round(peak_mem_mb(device), 1)}
            if val_rows is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == total):
                last.update(evaluate(model, val_rows, cfg.batch_size, device))
            if metrics_f and (step % cfg.log_every == 0 or step == total or "eval_loss" in last):
                metrics_f.write(json.dumps(last) + "\n")
                metrics_f.flush()
                eta = (time.time() - t_start) / max(step, 1) * (total - step)
                ev = f" eval {last['eval_loss']:.4f}" if "eval_loss" in last else ""
                tty = sys.stdout.isatty()
                end = "\n" if (not tty or step == total or ev) else ""
                print(f"{chr(13) if tty else ''}step {step}/{total} loss {loss_total:.4f}{ev} lr {lr:.2e} "
                      f"{last['tokens_per_s']:.0f} tok/s ETA {eta:.0f}s mem {fmt_mem(device)}   ", end=end, flush=True)
            if (cfg.save_every and step % cfg.save_every == 0) or stop["signal"]:
                save_checkpoint(out, step, model, opt, cfg.save_total_limit, dist_ctx)
            if stop["signal"]:
                say(f"\nstopped by signal {stop['signal']} at step {step}; checkpoint saved, --resume continues",
                    flush=True)
                raise SystemExit(130)
    finally:
        if metrics_f:
            metrics_f.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)

    # ---- outputs (rank 0)
    result = {"steps": step, "final": last, "data": stats}
    if cfg.full:
        plain = full_state_model(model, dist_ctx)
        if dist_ctx.rank == 0:
            save_model(plain, out / "model", layout="meta", tokenizer=tok_file(cfg))
            tokenizer.save(out / "model")
    elif dist_ctx.rank == 0:
        lora.save_adapter(model, out / "adapter")
        tokenizer.save(out / "adapter")
    if gen_eval:
        items = read_gen_eval(cfg.gen_eval)
        after = exact_match(model, tokenizer, items, cfg.template, device)
        result["exact_match_before"] = before[0] if before else None
        result["exact_match_after"] = after[0]
        if dist_ctx.rank == 0:
            print_gen_eval(items, before, after)
    if cfg.merge and not cfg.full and dist_ctx.rank == 0:
        lora.merge_lora(model)
        save_model(model, out / "merged", layout=cfg.merge_layout, tokenizer=tok_file(cfg))
        tokenizer.save(out / "merged")
        print(f"merged model ({cfg.merge_layout} layout) written to {out / 'merged'}")
    if dist_ctx.rank == 0:
        plot_loss(out)
        (out / "result.json").write_text(json.dumps(result, indent=2))
        print(f"done: {step} steps; outputs in {out}", flush=True)
    dist_ctx.barrier()
    return result


def tok_file(cfg: TrainConfig) -> str | None:
    p = find_tokenizer(cfg.ckpt)
    return str(p) if p else None


def summary_lines(cfg: TrainConfig, model, quantized: bool, device: torch.device, dtype: torch.dtype, stats: dict,
                  n_tokens: int, total: int, per_step: int, out: Path) -> list[str]:
    """What this run is, in a few lines (the full config goes to OUT/run_config.json)."""
    from llama import Transformer
    with torch.device("meta"):  # the architecture's parameter count, whatever quantization did to the modules
        n_params = sum(p.numel() for p in Transformer(model.args).parameters())
    a = model.args
    ckpt = Path(cfg.ckpt)
    disk = sum(f.stat().st_size for f in ckpt.glob("*") if f.suffix in (".pth", ".safetensors", ".bin"))
    layout = "Meta" if (ckpt / "params.json").is_file() else "HF"
    if cfg.full:
        mode = "full fine-tuning (every weight trains)"
    else:
        adapters = (f"LoRA r {cfg.lora_r}, alpha {cfg.lora_alpha:g}{', rsLoRA' if cfg.rslora else ''}, "
                    f"dropout {cfg.lora_dropout:g} on {cfg.lora_targets.replace(',', ', ')}")
        mode = f"QLoRA: NF4 base + {adapters}" if quantized else f"{adapters} (base not quantized)"
    precision = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    steps_per_epoch = math.ceil(stats["rows"] / per_step)
    return [
        f"run: {mode}; {precision} on {device}",
        f"  model:  {cfg.ckpt} ({layout} layout, {_count(n_params)} parameters: {a.n_layers} layers, dim {a.dim}, "
        f"vocab {a.vocab_size}; {f'{disk / 1e9:.1f} GB' if disk >= 1e9 else f'{disk / 1e6:.1f} MB'} of weights)",
        f"  data:   {stats['train_samples']:,} samples, {n_tokens:,} tokens -> {stats['rows']:,} rows of {cfg.seq_len} "
        f"tokens{' (packed)' if cfg.packing else ''}" + (f"; {stats['val_samples']:,} held out" if stats["val_samples"] else ""),
        f"  steps:  {total:,} ({total / steps_per_epoch:.3g} epochs of {steps_per_epoch:,} steps x {per_step:,} rows), "
        f"lr {cfg.lr:g} {cfg.schedule}",
        f"  output: {out} (full config in {out / 'run_config.json'})",
    ]


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def print_stats(stats: dict) -> None:
    print(f"{'data file':<40} {'rows':>7} {'train':>7} {'val':>6} {'skipped':>8} {'trunc':>6} "
          f"{'tokens':>9} {'min':>5} {'max':>5} {'mean':>7}")
    for path, s in [*stats["files"].items(), ("total", stats["total"])]:
        skipped = sum(s["skipped"].values())
        print(f"{path[-40:]:<40} {s['rows']:>7} {s['accepted']:>7} {s['val']:>6} {skipped:>8} {s['truncated']:>6} "
              f"{s['tokens']:>9} {s['min_tokens'] or 0:>5} {s['max_tokens']:>5} {s['mean_tokens']:>7}")
        for why, n in s["skipped"].items():
            print(f"    skipped {n}: {why}")
    print(f"packed into {stats['rows']} rows; packing efficiency {stats['packing_efficiency']:.1%} "
          f"(padding {stats['padding_fraction']:.1%})", flush=True)


def print_gen_eval(items, before, after) -> None:
    print("\nheld-out prompts (expected | before | after):")
    for k, ((msgs, want), a) in enumerate(zip(items, after[1])):
        b = before[1][k] if before else "-"
        print(f"  {msgs[-1]['content'][:40]!r:44} {want!r} | {b[:30]!r} | {a[:30]!r}")
    print(f"exact match: before {before[0]:.0%} -> after {after[0]:.0%}" if before else
          f"exact match after: {after[0]:.0%}", flush=True)


def plot_loss(out: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # matplotlib is a [bench] extra: the curve is optional
        return
    rows = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r.get("loss") is not None]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train")
    ev = [r for r in rows if "eval_loss" in r]
    if ev:
        ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Chat with a base model + adapter.


def chat(cfg: TrainConfig) -> None:
    from llama.generate import chat_loop
    device, dtype = resolve_device_dtype(cfg)
    run_cfg = Path(cfg.adapter).parent / "run_config.json" if cfg.adapter else None
    if run_cfg and run_cfg.exists() and "--template" not in sys.argv:
        cfg.template = json.loads(run_cfg.read_text())["template"]
    quantize = cfg.quant == "nf4" or (cfg.quant == "auto" and device.type == "cuda")
    hook = quant.quantize_on_load(compute_dtype=dtype) if quantize else None
    model = load_model(cfg.ckpt, dtype=dtype, device=device, hook=hook, progress=load_progress())
    tok_dir = Path(cfg.adapter) if cfg.adapter and (Path(cfg.adapter) / "tokenizer.model").exists() else None
    tokenizer = Tokenizer(str((tok_dir / "tokenizer.model") if tok_dir else find_tokenizer(cfg.ckpt)))
    if tokenizer.n_words > model.args.vocab_size:
        resize_embeddings(model, tokenizer.n_words)
    if cfg.adapter:
        lora.load_adapter(model, cfg.adapter)
    chat_loop(model, tokenizer, cfg.template)


# `python train.py` with no arguments: QLoRA on the bundled tiny Llama (demo/make_demo.py builds it), then the
# before/after answers to held-out prompts.
DEMO_FLAGS = ["--quant", "nf4", "--seq-len", "256", "--batch-size", "8", "--grad-accum", "1", "--lr", "2e-3",
              "--epochs", "16", "--lora-dropout", "0", "--gen-eval", str(DEMO / "data" / "heldout.jsonl"),
              "--out", "out/demo", "--overwrite"]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_args(argv or DEMO_FLAGS)
    try:
        cfg.ckpt = str(resolve_checkpoint(cfg.ckpt))  # a repo id becomes its snapshot in the Hugging Face hub cache
        if cfg.chat:
            chat(cfg)
        else:
            train(cfg)
    except (UserError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
