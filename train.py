"""Supervised fine-tuning of Llama 2 on chat data: full, LoRA or QLoRA, in one file.

Read top to bottom, it is the pipeline, in the order a run meets it:

    configuration (TrainConfig)
    -> data: data files -> dialogs -> chat template -> tokenized corpus on disk (OUT/data, llama.corpus)
       -> row plans packing it into rows of --seq-len -> micro-batches built when drawn
    -> model: Meta checkpoint -> NF4 quantize while loading -> LoRA
    -> optimizer and schedule -> one step -> eval -> checkpoints -> outputs: the PEFT adapter (and optionally a
       merged model, with a report comparing it to the adapter on its base) -> several processes -> train(): the loop
    -> the command line (also --chat, and --merge --adapter: merging a saved adapter without training)

The loss is next-token cross-entropy on assistant tokens only, averaged over every trained token of
an optimizer step (all micro-batches together), so gradient accumulation and packing do not change
what is optimised: a packed batch gives the same loss as its documents run one by one.

    python train.py                                 # the bundled demo: QLoRA on a tiny Llama, CPU
    python train.py --merge                         # the demo, any flags on top: here, also the merged model
    python train.py --ckpt llama-2-7b --data chats.jsonl --quant nf4
    python train.py --prepare-data --ckpt llama-2-7b --data chats.jsonl --out out/run   # tokenize only
    python train.py --chat --ckpt llama-2-7b --adapter out/run/adapter
    python train.py --merge --ckpt llama-2-7b --adapter out/run/adapter --out out/merged   # merge later
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import functools
import hashlib
import json
import math
import os
import pickle
import random
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# ---- Process settings (plumbing, the one place for them): MKL and c10 read these at first use, so they are set
# before torch is imported; a value already in the environment wins. benchmarks/bench_train.py gives the HF
# baseline the same settings, and benchmarks/README.md has what they are worth.
# - MKL_CBWR: fixed summation order whatever the operands' memory alignment, so a resumed run (another
#   process, another heap layout) stays bit-identical with the uninterrupted one.
# - THP_MEM_ALLOC_ENABLE: CPU allocations of 2 MB and up get transparent huge pages, so large fresh
#   activations are not faulted in 4 KiB page by page (Linux; no effect on CUDA memory).
PROCESS_ENV = {"MKL_CBWR": "AUTO,STRICT", "THP_MEM_ALLOC_ENABLE": "1"}
for _k, _v in PROCESS_ENV.items():
    os.environ.setdefault(_k, _v)

import numpy as np
import torch

import lora
import quant
from llama import Tokenizer, Transformer, corpus, load_model, save_model
from llama.chat import TEMPLATES, encode_chat, required_special_tokens, stop_ids
from llama.checkpoint import CheckpointError, find_tokenizer, resolve_checkpoint, weights_size
from llama.data import DataError, read_dialogs
from llama.files import Progress, atomic_folder
from llama.export import save_tokenizer_files
from llama.generate import (DTYPES, ChatOptions, add_chat_args, auto_dtype, chat_loop, chat_options, generate,
                            load_chat_model, resolve_device_dtype)
from llama.model import resize_embeddings

ROOT = Path(__file__).resolve().parent
DEMO = ROOT / "demo"
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}  # torch.bfloat16 -> "bf16"


# ---- Configuration: the dataclass defaults are the documentation; the CLI is generated from it (bottom of file).


def flag(default, help: str, choices: tuple[str, ...] | None = None, section: str = ""):
    """A TrainConfig field: its default, its --help text, the values argparse accepts, and, on the first field of
    each group, the --help section that it and the fields after it are listed in."""
    meta = {"help": help, "choices": choices, "section": section}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    data: list[str] = flag([str(DEMO / "data" / "train.jsonl")], "data files or folders, each path[:fraction] "
                           "(--data a.jsonl --data b.json:0.5 adds both), or one prepared folder", section="data")
    template: str = flag("llama2", "chat template the dialogs are rendered in", TEMPLATES)
    seq_len: int = flag(1024, "tokens per training row")
    packing: bool = flag(True, "one sample per row, padded, instead of packing several into each row")
    overlong: str = flag("truncate", "truncate or drop samples longer than --seq-len", ("truncate", "drop"))
    val_split: float = flag(0.0, "fraction of each file held out for eval")
    max_val: int = flag(1000, "cap on held-out samples per file")
    min_assistant_tokens: int = flag(1, "drop samples with fewer trained tokens")
    oasst_top_k: int = flag(0, "OASST threads whose assistant replies all rank below K (0: every thread)")
    oasst_lang: str = flag("", "comma-separated OASST languages to keep, e.g. en,de (\"\": all)")
    text_as_lm: bool = flag(False, "{\"text\"} rows without chat markers: train on the whole text (language modelling)")
    bad_rows: str = flag("error", "a bad row stops the run, or is left out (counted; listed in OUT/data/skipped.jsonl)",
                         ("error", "skip"))
    max_bad_fraction: float = flag(0.01, "with --bad-rows skip: more bad rows than this share of a file is an error")
    prepare_data: bool = flag(False, "tokenize --data into OUT/data and exit (loads only the tokenizer)")
    data_workers: int = flag(0, "tokenizer processes (0: one per core)")
    show_samples: int = flag(0, "print this many prepared samples with the trained spans marked")
    ckpt: str = flag(str(DEMO / "tiny-llama"), "Meta folder (consolidated.*.pth), HF folder, or org/name (hub cache)",
                     section="model")
    dtype: str = flag("auto", "auto: bf16 on CUDA and on CPUs with native bf16 (AMX, AVX512-BF16); elsewhere "
                      "fp32, bf16 for checkpoints over 2 GiB", ("auto", *DTYPES))
    device: str = flag("auto", "auto (the GPU when there is one), cpu, cuda, cuda:1, ...")
    grad_checkpointing: bool = flag(False, "recompute each block's activations in backward: less memory, more time")
    lima_dropout: float = flag(0.0, "residual dropout rising linearly with depth up to this value (LIMA)")
    quant: str = flag("auto", "frozen base in NF4 (QLoRA) or not; auto: nf4 on CUDA, none on CPU",
                      ("none", "nf4", "auto"), section="LoRA and quantization")
    full: bool = flag(False, "full fine-tuning (every weight trains) instead of LoRA")
    lora_r: int = flag(16, "LoRA rank")
    lora_alpha: float = flag(32.0, "LoRA scale: the update B @ A is scaled by alpha / r")
    lora_dropout: float = flag(0.05, "dropout on the adapters' input")
    lora_targets: str = flag("wq,wk,wv,wo,w1,w2,w3", "comma-separated projections that get adapters (Meta names)")
    rslora: bool = flag(False, "rank-stabilized LoRA: scale by alpha / sqrt(r)")
    init_adapter: str = flag("", "start from a saved adapter (second stage), fresh optimizer")
    batch_size: int = flag(4, "rows per micro-batch", section="optimization")
    grad_accum: int = flag(4, "micro-batches per optimizer step")
    epochs: float = flag(1.0, "passes over the training rows (fractions allowed)")
    max_steps: int = flag(0, "> 0 overrides --epochs")
    lr: float = flag(2e-4, "peak learning rate, reached after the warmup")
    min_lr: float = flag(0.0, "learning rate at the end of the schedule")
    schedule: str = flag("cosine", "decay after the warmup", ("cosine", "linear", "constant"))
    warmup_ratio: float = flag(0.05, "fraction of the steps spent warming up linearly")
    warmup_steps: int = flag(0, "> 0 overrides --warmup-ratio")
    optim: str = flag("adamw", "AdamW (torch), or bitsandbytes' 8-bit AdamW (paged: its state can move to CPU memory)",
                      ("adamw", "adamw_8bit", "paged_adamw_8bit"))
    weight_decay: float = flag(0.0, "AdamW weight decay")
    beta1: float = flag(0.9, "AdamW beta1")
    beta2: float = flag(0.999, "AdamW beta2")
    eps: float = flag(1e-8, "AdamW epsilon")
    max_grad_norm: float = flag(0.3, "gradient clipping norm (0 disables clipping)")
    max_bad_steps: int = flag(5, "abort after this many non-finite steps in a row")
    seed: int = flag(0, "seed for the initialisation, the data order, dropout and the val split")
    out: str = flag("out/run", "output folder: adapter/, metrics.jsonl, checkpoints, ...", section="run and output")
    overwrite: bool = flag(False, "reuse an --out that holds another run")
    resume: bool = flag(False, "continue the run in --out from its last checkpoint (same flags)")
    log_every: int = flag(1, "log every N optimizer steps")
    eval_every: int = flag(0, "0: eval only at the end (when there is a val split)")
    save_every: int = flag(0, "checkpoint every N steps (0: no intermediate checkpoints)")
    save_total_limit: int = flag(2, "checkpoints kept (0: all)")
    gen_eval: str = flag("", "JSONL of dialogs whose last assistant turn is the expected answer")
    merge: bool = flag(False, "also write the merged model (and merge_report.json) to OUT/merged; with --adapter, "
                              "merge that adapter into --ckpt and write it to --out instead of training",
                       section="merge and chat")
    merge_layout: str = flag("hf", "layout of OUT/merged: hf (config.json + safetensors) or meta (consolidated.00.pth)",
                             ("meta", "hf"))
    report_data: str = flag("", "--merge --adapter: the data file the merge report compares on (default: the "
                                "adapter's run's corpus)")
    report_dense_merge: bool = flag(True, "with an NF4 base, the merge report also scores the adapter merged into "
                                          "the original dense weights (the common mistake; loads the dense base again)")
    chat: bool = flag(False, "chat with --ckpt (and --adapter) instead of training; takes the flags below")
    adapter: str = flag("", "a LoRA adapter folder (OUT/adapter) to chat with (--chat) or merge (--merge) onto --ckpt")


class UserError(Exception):
    """Bad input from the user: printed as one paragraph, exit code 2, no traceback."""


def plural(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


# ---- Data: --data -> the prepared corpus (OUT/data, or a prepared folder given as --data) -> row plans.


def load_tokenizer(cfg: TrainConfig) -> tuple[Tokenizer, list[str]]:
    """The checkpoint's tokenizer plus the template's special tokens it lacks (ChatML on a base model)."""
    tok_path = find_tokenizer(cfg.ckpt)
    if tok_path is None:
        raise UserError(f"no tokenizer.model in {cfg.ckpt} or its parent folder")
    tokenizer = Tokenizer(str(tok_path))
    new_tokens = [t for t in required_special_tokens(cfg.template) if t not in tokenizer.special_tokens]
    tokenizer.add_special_tokens(new_tokens)
    return tokenizer, new_tokens


def take_prepared_settings(cfg: TrainConfig, given: set[str]) -> None:
    """A prepared folder given as the only --data brings the --template and --seq-len it was prepared with, unless
    the command line names them (llama.corpus.check_fits then says whether the folder fits)."""
    if len(cfg.data) == 1 and corpus.is_prepared(Path(cfg.data[0])):
        key = corpus.read_meta(Path(cfg.data[0]))["key"]
        for name in ("template", "seq_len"):
            if name in key and name not in given:
                setattr(cfg, name, key[name])


def data_options(cfg: TrainConfig) -> corpus.DataOptions:
    """The options that shape the prepared arrays: the TrainConfig fields of the same names."""
    opts = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(corpus.DataOptions)}
    opts["oasst_lang"] = tuple(x.strip() for x in cfg.oasst_lang.split(",") if x.strip())  # "en,de" -> ("en", "de")
    return corpus.DataOptions(**opts)


def prepare_or_reuse(cfg: TrainConfig, tokenizer: Tokenizer, folder: Path) -> None:
    """OUT/data: reused when its key (data file contents, tokenizer, options) matches this run's, else written
    (again). On --resume a difference is an error: the checkpoints trained on the corpus that is there."""
    opts = data_options(cfg)
    key = corpus.corpus_key(cfg.data, tokenizer, opts)
    diff = corpus.key_difference(corpus.read_meta(folder)["key"], key) if corpus.is_prepared(folder) else None
    if diff == []:
        print(f"data: reusing {folder} (same data files, tokenizer and options)", flush=True)
        return
    if diff and cfg.resume:
        raise UserError(f"--resume: {folder} was prepared from other data or options than this run's (they "
                        f"differ in: {', '.join(diff)}), and the checkpoints trained on it. Resume with the same "
                        "--data and data flags, or start a new run (another --out, or --overwrite)")
    t0 = time.time()
    meta = corpus.prepare_corpus(cfg.data, tokenizer, folder, opts, workers=cfg.data_workers, key=key)
    print(f"data: prepared {folder} in {time.time() - t0:.1f}s ({meta['splits']['train']['tokens']:,} "
          "training tokens)", flush=True)


def print_stats(stats: dict) -> None:
    print(f"{'data file':<40} {'rows':>7} {'train':>7} {'val':>6} {'skipped':>8} {'trunc':>6} "
          f"{'tokens':>9} {'min':>5} {'max':>5} {'mean':>7}")
    for path, s in [*stats["files"].items(), ("total", stats["total"])]:
        skipped = sum(s["skipped"].values())
        path = path if len(path) <= 40 else "..." + path[-37:]  # the end of a long path: the file's name
        print(f"{path:<40} {s['rows']:>7} {s['accepted']:>7} {s['val']:>6} {skipped:>8} {s['truncated']:>6} "
              f"{s['tokens']:>9} {s['min_tokens'] or 0:>5} {s['max_tokens']:>5} {s['mean_tokens']:>7}")
        for why, n in s["skipped"].items():
            print(f"    skipped {n}: {why}")
    print(f"packed into {plural(stats['rows'], 'row')}; packing efficiency {stats['packing_efficiency']:.1%} "
          f"(padding {stats['padding_fraction']:.1%})", flush=True)


@dataclass
class Data:
    """The corpus a run trains on: the tokenizer (with the template's added tokens), the splits (memory-mapped)
    and the row plans packing them."""
    tokenizer: Tokenizer
    new_tokens: list[str]
    folder: Path
    train: corpus.Split
    rows: corpus.Rows
    val: corpus.Split | None
    val_rows: corpus.Rows | None
    stats: dict


def load_data(cfg: TrainConfig, out: Path, dist: Dist) -> Data:
    """Tokenizer -> the prepared corpus on disk (a prepared folder given as the only --data, as it is; else
    OUT/data) -> checked against this run (and on --resume against the corpus OUT trained on) -> row plans;
    training builds each micro-batch when it is drawn."""
    tokenizer, new_tokens = load_tokenizer(cfg)
    given = len(cfg.data) == 1 and corpus.is_prepared(Path(cfg.data[0]))
    folder = Path(cfg.data[0]) if given else out / "data"
    if not given and dist.rank == 0:
        prepare_or_reuse(cfg, tokenizer, folder)
    dist.barrier()
    meta, splits = corpus.open_corpus(folder)
    corpus.check_fits(folder, meta["key"], tokenizer, cfg.template, cfg.seq_len)
    key_sha = hashlib.sha256(json.dumps(meta["key"], sort_keys=True).encode()).hexdigest()
    recorded = out / "data_stats.json"  # on --resume, its corpus_key_sha256 names the corpus OUT trained on
    trained_on = json.loads(recorded.read_text()).get("corpus_key_sha256") if cfg.resume and recorded.exists() else None
    if trained_on not in (None, key_sha):
        raise UserError(f"--resume: the corpus {folder} is not the one {out} trained on (its meta.json key "
                        "differs from the one recorded in data_stats.json); resume with that corpus, or start "
                        "a new run")
    if given:
        dist.say(f"data: the prepared folder {folder}")
    train_split, val_split = splits["train"], splits.get("val")
    rows = corpus.make_rows(train_split, cfg.seq_len, cfg.packing)
    val_rows = corpus.make_rows(val_split, cfg.seq_len, cfg.packing) if val_split is not None else None
    efficiency = round(int(train_split.offsets[-1]) / (len(rows) * cfg.seq_len), 4)
    stats = {**meta["stats"], "rows": len(rows), "packing_efficiency": efficiency,
             "padding_fraction": round(1 - efficiency, 4), "train_samples": len(train_split),
             "val_samples": len(val_split) if val_split is not None else 0, "corpus": str(folder),
             "corpus_key_sha256": key_sha}
    if dist.rank == 0:
        print_stats(stats)
        if cfg.show_samples:
            print(corpus.show_samples(train_split, tokenizer, cfg.show_samples, color=sys.stdout.isatty()), flush=True)
    return Data(tokenizer, new_tokens, folder, train_split, rows, val_split, val_rows, stats)


def draw(split: corpus.Split, rows: corpus.Rows, which, cfg: TrainConfig, pad_id: int, device) -> dict:
    """The micro-batch of rows `which`, built from the memory-mapped corpus and moved to the device."""
    b = corpus.build_batch(split, rows, which, cfg.seq_len, pad_id)
    return {k: torch.from_numpy(v).to(device) for k, v in b.items()}


# ---- Model: load base weights -> quantize (while streaming) -> add tokens -> LoRA.


def quantize_hook(cfg: TrainConfig, device: torch.device, dtype: torch.dtype):
    """The one quantize-or-not decision (training and --chat): the frozen base is NF4 with --quant nf4, or with
    --quant auto on CUDA unless --full. Returns load_model's hook that quantizes each projection as it streams
    off disk, or None."""
    if cfg.full and cfg.quant == "nf4":
        raise UserError("--full trains every weight; it cannot be combined with --quant nf4")
    quantize = cfg.quant == "nf4" or (cfg.quant == "auto" and device.type == "cuda" and not cfg.full)
    return quant.quantize_on_load(compute_dtype=dtype) if quantize else None


def load_progress():
    """load_model's progress(done, total) callback, on one progress line."""
    line = Progress("loading weights")

    def progress(done: int, total: int) -> None:
        t = line.elapsed()
        line(f"{done}/{total} tensors ({100 * done // total}%), {t:.0f}s, ETA {t / done * (total - done):.0f}s",
             done=done == total)
    return progress


def build_model(cfg: TrainConfig, device: torch.device, dtype: torch.dtype, vocab_size: int = 0,
                progress=None) -> tuple[Transformer, bool]:
    """Load base weights -> quantize (while streaming) -> grow the embeddings to `vocab_size` for added tokens
    (0: none) -> LoRA (or all trainable). Returns the model and whether its base is NF4."""
    hook = quantize_hook(cfg, device, dtype)
    model = load_model(cfg.ckpt, dtype=dtype, device=device, hook=hook, progress=progress)
    if model.args.max_seq_len < cfg.seq_len:
        raise UserError(f"--seq-len {cfg.seq_len} is longer than the model supports "
                        f"(max_seq_len {model.args.max_seq_len} in {cfg.ckpt})")
    if vocab_size:  # the new rows must train and be saved with the adapter
        resize_embeddings(model, vocab_size)
    for i, block in enumerate(model.layers):  # LIMA: residual dropout rising linearly with depth (0: none)
        block.resid_dropout = cfg.lima_dropout * i / max(len(model.layers) - 1, 1)
    model.grad_checkpointing = cfg.grad_checkpointing
    if not cfg.full:  # (with --full every weight trains: load_model's parameters all require grad)
        extra = ("tok_embeddings", "output") if vocab_size else ()
        targets = tuple(t.strip() for t in cfg.lora_targets.split(",") if t.strip())
        lora.apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=targets,
                        rslora=cfg.rslora, modules_to_save=extra)
        if cfg.init_adapter:
            lora.load_adapter(model, cfg.init_adapter)
    return model, hook is not None


# ---- Optimizer and schedule.


def make_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter], device: torch.device):
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.optim == "adamw":
        return torch.optim.AdamW(params, fused=device.type == "cuda", **kw)
    # imported only for the 8-bit optimizers (importing bitsandbytes loads its native library: slow);
    # paged falls back to unpaged memory off CUDA
    import bitsandbytes as bnb
    return (bnb.optim.PagedAdamW8bit if cfg.optim == "paged_adamw_8bit" else bnb.optim.AdamW8bit)(params, **kw)


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
    return cfg.lr  # constant


@dataclass
class Run:
    """What the loop trains, where, and how far: the model, its trainable parameters and their optimizer, the device
    and compute dtype, the processes, OUT; the schedule's length and the step reached (the one field that changes)."""
    model: torch.nn.Module
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    device: torch.device
    dtype: torch.dtype
    dist: Dist
    out: Path
    per_step: int  # rows per optimizer step, all ranks together
    steps_per_epoch: int
    total: int  # optimizer steps
    step: int = 0


@functools.lru_cache(maxsize=1)
def epoch_order(n_rows: int, seed: int) -> torch.Tensor:
    return torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed))


def step_rows(cfg: TrainConfig, run: Run, n_rows: int) -> torch.Tensor:
    """The rows of optimizer step run.step (all ranks): [k*per_step, (k+1)*per_step) of its epoch's permutation."""
    epoch, pos = divmod(run.step * run.per_step, run.steps_per_epoch * run.per_step)
    perm = epoch_order(n_rows, cfg.seed + epoch)
    idx = perm[pos: pos + run.per_step]
    if len(idx) < run.per_step:  # the epoch's last step wraps around (as DistributedSampler pads), so every
        idx = torch.cat([idx, perm[: run.per_step - len(idx)]])  # rank runs the same micro-batches
    return idx


# ---- One step: the model computes the loss (`Transformer.forward(..., labels=)`: the head only sees trained
# tokens), normalised by the trained tokens of the whole global batch.


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16/fp16 autocast on CUDA. Elsewhere none: the weights are already in the run's dtype and the adapters cast
    their inputs to it themselves, so every matmul runs in it without autocast's per-op casts."""
    return torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda" and dtype != torch.float32)


def loss_sum(model, tokens, labels, doc_ids) -> torch.Tensor:
    """Sum of token losses of a batch (labels already shifted: labels[i] is the target after tokens[i])."""
    return model(tokens, doc_ids, labels=labels)


def train_step(cfg: TrainConfig, run: Run, data: Data, lr: float) -> tuple[float, float]:
    """One optimizer step over step run.step's rows (this rank takes its share): (loss, gradient norm). The loss is
    normalised by the trained tokens of the whole global batch. A non-finite step is not applied."""
    idx = step_rows(cfg, run, len(data.rows))
    dist, device, params = run.dist, run.device, run.params
    n_target = int(data.rows.targets[idx.numpy()].sum())  # over the global batch, on every rank
    per_rank = run.per_step // dist.world
    mine = idx[dist.rank * per_rank: (dist.rank + 1) * per_rank]
    for g in run.optimizer.param_groups:
        g["lr"] = lr
    loss_total = torch.zeros((), device=device)
    for m in range(0, len(mine), cfg.batch_size):
        b = draw(data.train, data.rows, mine[m: m + cfg.batch_size].numpy(), cfg, data.tokenizer.eos_id, device)
        with autocast(device, run.dtype):
            loss = loss_sum(run.model, b["tokens"], b["labels"], b["doc_ids"]) / max(n_target, 1)
        # FSDP averages gradients over ranks; our loss is already normalised over the global batch
        (loss * dist.world if dist.fsdp else loss).backward()
        loss_total += loss.detach()
    if dist.world > 1:
        torch.distributed.all_reduce(loss_total)
        if not dist.fsdp:
            all_reduce_grads(params)
    loss_total = loss_total.item()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)  # FSDP: a DTensor
    if math.isfinite(loss_total) and math.isfinite(grad_norm):
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss_total, grad_norm


def report_bad_step(cfg: TrainConfig, run: Run, metrics_f, lr: float, bad_steps: int, values: tuple) -> None:
    """A non-finite step (not applied): logged as skipped; too many in a row end the run."""
    if metrics_f:
        metrics_f.write(json.dumps({"step": run.step, "skipped": "non-finite loss or gradient", "loss": None,
                                    "lr": lr}) + "\n")
    run.dist.say(f"\nstep {run.step}: non-finite loss/gradient ({values[0]}, {values[1]}); step skipped "
                 f"({bad_steps}/{cfg.max_bad_steps} in a row)")
    if bad_steps >= cfg.max_bad_steps:
        raise UserError(f"{bad_steps} non-finite steps in a row at step {run.step}: the run diverged. "
                        "Lower --lr, use fp32/bf16 instead of fp16, or check the data.")


# ---- Eval: the loss on the held-out rows; the demo's before/after exact match on held-out prompts.


@torch.no_grad()
@torch.no_grad()  # no graph, and head_ce takes no gradient in its forward
def evaluate(cfg: TrainConfig, run: Run, data: Data) -> dict:
    run.model.eval()
    total = 0.0
    for s in range(0, len(data.val_rows), cfg.batch_size):
        which = np.arange(s, min(s + cfg.batch_size, len(data.val_rows)))
        b = draw(data.val, data.val_rows, which, cfg, data.tokenizer.eos_id, run.device)
        total += loss_sum(run.model, b["tokens"], b["labels"], b["doc_ids"]).item()
    run.model.train()
    loss = total / max(int(data.val_rows.targets.sum()), 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50))}


def read_gen_eval(path: str) -> list[tuple[list[dict], str]]:
    """Dialogs whose last turn is the expected assistant answer -> (prompt messages, answer)."""
    items = []
    for d in read_dialogs(Path(path)):
        msgs = d.get("messages")
        if not msgs or msgs[-1]["role"] != "assistant":
            raise UserError(f"{d['where']}: the last message must be the expected assistant answer")
        items.append((msgs[:-1], msgs[-1]["content"].strip()))
    return items


@torch.no_grad()
def exact_match(model, tokenizer: Tokenizer, items, template: str) -> tuple[float, list[str]]:
    prompts = [encode_chat(tokenizer, m, template, add_generation_prompt=True)[0] for m, _ in items]
    outs = generate(model, prompts, 48, stop_ids=stop_ids(tokenizer, template))
    answers = [tokenizer.decode(o).strip() for o in outs]
    score = sum(a == want for a, (_, want) in zip(answers, items)) / max(len(items), 1)
    return score, answers


def print_gen_eval(items, before, after) -> None:
    print("\nheld-out prompts (expected | before | after):")
    for k, ((msgs, want), a) in enumerate(zip(items, after[1])):
        b = before[1][k] if before else "-"
        print(f"  {msgs[-1]['content'][:40]!r:44} {want!r} | {b[:30]!r} | {a[:30]!r}")
    print(f"exact match: before {before[0]:.0%} -> after {after[0]:.0%}" if before else
          f"exact match after: {after[0]:.0%}", flush=True)


# ---- Checkpoints: OUT/checkpoint-STEP holds the trainable weights, the optimizer, every RNG and the step, and
# appears whole or not at all (llama.files.atomic_folder), so a crash at any moment leaves the previous one intact.


def rng_state() -> dict:
    """Every RNG's state as tensors and plain lists/numbers, so that torch.load(weights_only=True) reads it."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    s = {"torch": torch.get_rng_state(), "python": [version, list(mt), gauss],
         "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    version, mt, gauss = s["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def load_state(file: Path) -> dict:
    """A checkpoint's state file, read with torch.load(weights_only=True): tensors and plain containers only,
    so a tampered or foreign file cannot run code; anything else is a CheckpointError naming the file."""
    try:
        return torch.load(file, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{file}: not a checkpoint state this program wrote (only tensors and plain "
                              f"containers are loaded, never code): {first}") from None


class _DCPMetadataUnpickler(pickle.Unpickler):
    """Unpickles only what torch.distributed.checkpoint's .metadata holds (its metadata dataclasses, torch.Size,
    dtypes, layouts, paths): dcp.load reads that file with plain pickle, so it is checked this way first."""
    ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
               *(("pathlib", p) for p in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"))}

    def find_class(self, module: str, name: str):
        obj = super().find_class(module, name)
        if (module, name) in self.ALLOWED or (module == "torch" and isinstance(obj, torch.dtype)) \
                or (module.startswith("torch.distributed.checkpoint.") and isinstance(obj, type)):
            return obj
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


def check_dcp_metadata(file: Path) -> None:
    """CheckpointError unless `file` unpickles to nothing but checkpoint metadata (no code can run)."""
    try:
        with open(file, "rb") as f:
            _DCPMetadataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{file}: not checkpoint metadata this program wrote (only metadata classes are "
                              f"unpickled, never code): {e}") from None


def save_checkpoint(run: Run, keep: int) -> None:
    """OUT/checkpoint-STEP: state.pt (one process, or data-parallel adapters: rank 0 writes), or with FSDP every
    rank's shard through torch.distributed.checkpoint into rank 0's temporary folder; then the oldest beyond
    `keep` (0: all kept) and any temporary folder a killed run left go."""
    dist = run.dist
    final = run.out / f"checkpoint-{run.step}"
    with atomic_folder(final, fsync=True) if dist.rank == 0 else contextlib.nullcontext() as tmp:
        tmp = dist.share(tmp)  # FSDP: every rank writes its shard there
        if dist.fsdp:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict
            msd, osd = get_state_dict(run.model, run.optimizer)
            dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(tmp / "dcp"))
            torch.save({"step": run.step, "rng": rng_state()}, tmp / f"rng-rank{dist.rank}.pt")
        if dist.rank == 0:
            state = {"step": run.step, "rng": rng_state()}
            if not dist.fsdp:
                trainable = {n: p.detach().cpu() for n, p in run.model.named_parameters() if p.requires_grad}
                state.update(model=trainable, optimizer=run.optimizer.state_dict())
            with open(tmp / "state.pt", "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
        dist.barrier()  # every rank's files are written before rank 0 renames the folder into place
    if dist.rank == 0:
        for old in list_checkpoints(run.out)[:-keep] if keep > 0 else []:
            shutil.rmtree(run.out / f"checkpoint-{old}", ignore_errors=True)
        for stale in run.out.glob(".tmp-checkpoint-*"):
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()


def load_checkpoint(ck: Path, run: Run) -> int:
    """The step a checkpoint was saved at; its weights, optimizer and RNG states loaded into the run."""
    state = load_state(ck / "state.pt")
    if run.dist.fsdp:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        msd, osd = get_state_dict(run.model, run.optimizer)
        sd = {"model": msd, "optimizer": osd}
        check_dcp_metadata(ck / "dcp" / ".metadata")  # dcp.load unpickles it; the tensors it loads weights_only
        dcp.load(sd, checkpoint_id=str(ck / "dcp"))
        set_state_dict(run.model, run.optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"])
        set_rng_state(load_state(ck / f"rng-rank{run.dist.rank}.pt")["rng"])
    else:
        named = dict(run.model.named_parameters())
        with torch.no_grad():
            for n, t in state["model"].items():
                named[n].copy_(t)
        run.optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
    return state["step"]


def list_checkpoints(out: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if (p / "state.pt").exists())


# ---- Outputs: OUT is checked first, written once every input is checked, and filled as the run goes.


PREPARED = ("data", "data_stats.json")  # what --prepare-data leaves in OUT: not a run


def check_out(cfg: TrainConfig) -> Path:
    """Refuse an --out that holds another run unless --resume or --overwrite; creates nothing yet, so a run
    that fails on bad input leaves no half-written folder."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    # what --prepare-data leaves (the corpus and its report) is not a run: training may follow in the same --out
    if out.exists() and any(p.name not in PREPARED for p in out.iterdir()) and not (cfg.resume or cfg.overwrite):
        raise UserError(f"--out {out} already holds files"
                        + (" from another run" if (out / "run_config.json").exists() else "")
                        + "; pass --resume to continue it, --overwrite to replace it, or choose another --out")
    return out


def check_disk(out: Path, params: list[torch.nn.Parameter], cfg: TrainConfig) -> None:
    """A checkpoint holds the trainable weights (fp32) and AdamW's two moments (fp32, ~1 byte each for 8-bit)."""
    bytes_per_param = 4 + (2 if "8bit" in cfg.optim else 8)
    one = sum(p.numel() for p in params) * bytes_per_param + (1 << 20)
    need = one * ((cfg.save_total_limit + 1) if cfg.save_every else 1)
    free = shutil.disk_usage(next(p for p in (out, out.parent, Path(".")) if p.exists())).free
    if free < need:
        raise UserError(f"--out {out}: {free / 2**30:.2f} GiB free on disk, but {need / 2**30:.2f} GiB are needed "
                        f"({cfg.save_total_limit} checkpoints of {one / 2**30:.2f} GiB "
                        "plus the final adapter); free space, lower --save-total-limit or choose another --out")


def summary_lines(cfg: TrainConfig, run: Run, data: Data, quantized: bool) -> list[str]:
    """What this run is, in a few lines (the full config goes to OUT/run_config.json)."""
    a = run.model.args
    with torch.device("meta"):  # the architecture's parameter count, whatever quantization did to the modules
        n_params = sum(p.numel() for p in Transformer(a).parameters())
    ckpt = Path(cfg.ckpt)
    disk = weights_size(ckpt)
    layout = "Meta" if (ckpt / "params.json").is_file() else "HF"
    if cfg.full:
        mode = "full fine-tuning (every weight trains)"
    else:
        adapters = (f"LoRA r {cfg.lora_r}, alpha {cfg.lora_alpha:g}{', rsLoRA' if cfg.rslora else ''}, "
                    f"dropout {cfg.lora_dropout:g} on {cfg.lora_targets.replace(',', ', ')}")
        mode = f"QLoRA: NF4 base + {adapters}" if quantized else f"{adapters} (base not quantized)"
    # an NF4 weight counts as its in * out values; an FSDP-sharded weight as its whole (a DTensor's numel is global)
    n_train, n_total = lora.count_parameters(run.model)
    why = f"--dtype auto: {auto_dtype(run.device, cfg.ckpt)[1]}" if cfg.dtype == "auto" else f"--dtype {cfg.dtype}"
    precision = f"{DTYPE_NAMES[run.dtype]} on {run.device} ({why})"
    stats, n_tokens, out = data.stats, int(data.train.offsets[-1]), run.out
    total, per_epoch = run.total, run.steps_per_epoch
    size = f"{disk / 1e9:.1f} GB" if disk >= 1e9 else f"{disk / 1e6:.1f} MB"
    held_out = f"; {stats['val_samples']:,} held out" if stats["val_samples"] else ""
    return [
        f"run: {mode}; {precision}" + (f"; {run.dist.world} processes" if run.dist.world > 1 else ""),
        f"  trainable params: {n_train:,} of {n_total:,} ({100 * n_train / n_total:.3f}%)",
        f"  model:  {cfg.ckpt} ({layout} layout, {_count(n_params)} parameters: {a.n_layers} layers, dim {a.dim}, "
        f"vocab {a.vocab_size}; {size} of weights)",
        f"  data:   {plural(stats['train_samples'], 'sample')}, {n_tokens:,} tokens -> {plural(stats['rows'], 'row')} "
        f"of {cfg.seq_len} tokens{' (packed)' if cfg.packing else ''}{held_out}",
        f"  steps:  {total:,} ({total / per_epoch:.3g} epochs of {plural(per_epoch, 'step')} x "
        f"{plural(run.per_step, 'row')}), lr {cfg.lr:g} {cfg.schedule}",
        f"  output: {out} (full config in {out / 'run_config.json'})",
    ]


def _count(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def start_run(cfg: TrainConfig, run: Run, data: Data, quantized: bool) -> None:
    """OUT written, now that every input is checked (with --overwrite the previous run goes, the corpus in use
    stays); the summary; on --resume the last checkpoint loaded and the metrics logged after it dropped."""
    out, dist = run.out, run.dist
    if dist.rank == 0:
        check_disk(out, run.params, cfg)
        if cfg.overwrite and not cfg.resume and out.exists():
            for p in out.iterdir():
                if p != data.folder:
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist.say("\n".join(summary_lines(cfg, run, data, quantized)))
    if cfg.resume and list_checkpoints(out):
        ck = out / f"checkpoint-{list_checkpoints(out)[-1]}"
        run.step = load_checkpoint(ck, run)
        dist.say(f"resumed from {ck} at step {run.step}")
    if dist.rank == 0:
        if cfg.resume and (out / "metrics.jsonl").exists():  # drop lines logged after the checkpoint
            kept = [ln for ln in (out / "metrics.jsonl").read_text().splitlines() if json.loads(ln)["step"] <= run.step]
            (out / "metrics.jsonl").write_text("".join(ln + "\n" for ln in kept))
        # quant and dtype as resolved ("auto" decided): the merge command loads the base as this run had it
        resolved = {"quant": "nf4" if quantized else "none", "dtype": DTYPE_NAMES[run.dtype]}
        (out / "run_config.json").write_text(json.dumps(dataclasses.asdict(cfg) | resolved, indent=2))
        (out / "data_stats.json").write_text(json.dumps(data.stats, indent=2))


def peak_mem_mb(device) -> float:
    """Peak memory of this process: CUDA allocations on a GPU, else the peak resident set (Linux: in KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import resource  # Unix only
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def log_step(metrics_f, line: Progress, m: dict, total: int) -> None:
    """A step's metrics: one line of OUT/metrics.jsonl and the console's step line (rank 0)."""
    metrics_f.write(json.dumps(m) + "\n")
    step, ev = m["step"], f" eval {m['eval_loss']:.4f}" if "eval_loss" in m else ""
    eta = line.elapsed() / max(step, 1) * (total - step)
    line(f"step {step}/{total} loss {m['loss']:.4f}{ev} lr {m['lr']:.2e} {m['tokens_per_s']:.0f} tok/s ETA {eta:.0f}s "
         f"mem {m['peak_mem_mb'] / 1024:.1f}GiB", done=step == total or bool(ev))


def plot_loss(out: Path) -> None:
    try:
        from matplotlib.figure import Figure  # a figure without pyplot: no GUI backend, nothing to close
    except ImportError:  # matplotlib is a [bench] extra: the curve is optional
        return
    rows = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r.get("loss") is not None]
    if not rows:
        return
    fig = Figure(figsize=(6, 3.5), layout="tight")
    ax = fig.subplots()
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train")
    ev = [r for r in rows if "eval_loss" in r]
    if ev:
        ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="eval")
    ax.set(xlabel="step", ylabel="loss")
    ax.legend()
    fig.savefig(out / "loss.png", dpi=100)


def write_outputs(cfg: TrainConfig, run: Run, data: Data, last: dict, gen_eval, before) -> dict:
    """The adapter (or the full model), the gen-eval answers, the merged model, the loss curve, result.json."""
    out, dist, tokenizer, model = run.out, run.dist, data.tokenizer, run.model
    result = {"steps": run.step, "final": last, "data": data.stats}
    if cfg.full:
        plain = full_state_model(model, dist)
        if dist.rank == 0:
            save_model(plain, out / "model", layout="meta", tokenizer=tokenizer, template=cfg.template)
    elif dist.rank == 0:
        lora.save_adapter(model, out / "adapter", base_model_name_or_path=cfg.ckpt)
        save_tokenizer_files(tokenizer, out / "adapter", cfg.template, model=False, max_length=model.args.max_seq_len)
    if gen_eval:
        after = exact_match(model, tokenizer, gen_eval, cfg.template)
        result.update(exact_match_before=before[0] if before else None, exact_match_after=after[0])
        if dist.rank == 0:
            print_gen_eval(gen_eval, before, after)
    if cfg.merge and not cfg.full and dist.rank == 0:
        splits = {"train": data.train} if data.val is None else {"val": data.val}
        merge_model(cfg, model, tokenizer, report_sample(splits, "the run's corpus"), out / "merged", out / "adapter")
    if dist.rank == 0:
        plot_loss(out)
        (out / "result.json").write_text(json.dumps(result, indent=2))
        print(f"done: {plural(run.step, 'step')}; outputs in {out}", flush=True)
    dist.barrier()
    return result


# ---- Merging: the adapter folded into its base, one dense model (the in-run --merge and the `--merge --adapter`
# command both call merge_model), and a report that the merged model computes what the adapter on that base did.
# The report runs a sample through the adapter on its base (the reference), then through the merged model, and
# compares the next-token distributions at the trained (assistant) positions: mean KL(reference || merged) per
# token, each model's perplexity, and how often the two argmax tokens agree. Over an NF4 base it also scores the
# common mistake: the adapter merged into the original dense weights, not the dequantized NF4 ones it trained on.

REPORT_SAMPLES, REPORT_TOKENS = 64, 2048  # the report's sample: the first samples of a split, at most these
MERGED_SHARD_BYTES = 2 * 10**9  # HF layout: save_model makes one shard at a time, all the merge adds to the base
# A merged model whose KL from the adapter on its base exceeds this (nats per trained token) is a warning: it is not
# the model that was trained. In fp32 a correct merge only reorders sums (its KL is rounding noise, many orders
# below). In bf16/fp16 the merged W + s * B @ A is also rounded to the weight's 8 (11) mantissa bits, which the
# unmerged model never does, and most of a small update is below that step: a correct merge costs much more,
# hence the higher limit (measured values: docs/exports.md).
KL_WARN = {torch.float32: 1e-3, torch.bfloat16: 1e-2, torch.float16: 1e-2}


class MergedLinear(torch.nn.Module):
    """A LoRALinear read as its merged weight W + s * B @ A (`merged_weight`), made each time it is used and
    dropped after: forward multiplies by it, and save_model writes it one tensor at a time (a module with
    dequantize() and no .weight, as an NF4Linear), so the merged model is only ever dense one layer at a time."""

    def __init__(self, adapted: lora.LoRALinear):
        super().__init__()
        assert getattr(adapted.base, "bias", None) is None  # Llama's projections have no bias
        self.in_features, self.out_features = adapted.in_features, adapted.out_features
        self.dequantize = adapted.merged_weight  # a bound method: the LoRALinear is not a registered submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.dequantize())


def report_sample(splits: dict[str, corpus.Split], source: str) -> tuple[str, list[dict]]:
    """(what it is, batches): the first samples of the val split (else the training split), at most REPORT_SAMPLES
    and REPORT_TOKENS tokens, packed into rows as training packs them, each row cut after its last sample."""
    name = "val" if "val" in splits else "train"
    split = splits[name]
    n = min(len(split), REPORT_SAMPLES, max(1, int(np.searchsorted(split.offsets, REPORT_TOKENS, "right")) - 1))
    sub = corpus.Split(split.ids, split.mask, split.offsets[:n + 1], split.targets[:n], pack_seq_len=split.pack_seq_len)
    lengths = sub.lengths
    rows = corpus.make_rows(sub, sub.pack_seq_len or int(lengths.max()))
    batches = []
    for r in range(len(rows)):
        used = int(lengths[rows.samples[rows.starts[r]:rows.starts[r + 1]]].sum())
        b = corpus.build_batch(sub, rows, [r], max(sub.pack_seq_len, used), 0)
        batches.append({k: torch.from_numpy(v[:, :used]) for k, v in b.items()})
    return f"{n} samples of the {name} split of {source}", batches


@torch.no_grad()
def score(model, batches: list[dict], ref: torch.Tensor | None = None) -> tuple[dict, torch.Tensor | None]:
    """Runs the sample: ({"ppl"}, log-probs [trained positions, vocab] in fp64); given the reference's log-probs
    `ref`, ({"kl", "ppl", "top1_agreement"} against them, None), keeping nothing."""
    model.eval()
    device = model.tok_embeddings.weight.device
    logps, nll, kl, agree, n = [], 0.0, 0.0, 0, 0
    for b in batches:
        keep = (b["labels"] != -100).to(device)
        logp = torch.log_softmax(model(b["tokens"].to(device), b["doc_ids"].to(device))[keep].double(), -1)
        nll -= logp.gather(1, b["labels"].to(device)[keep][:, None]).sum().item()
        if ref is None:
            logps.append(logp)
        else:
            r = ref[n:n + len(logp)]
            kl += (r.exp() * (r - logp)).sum().item()
            agree += (r.argmax(-1) == logp.argmax(-1)).sum().item()
        n += len(logp)
    if ref is None:
        return {"ppl": math.exp(nll / n)}, torch.cat(logps)
    return {"kl": kl / n, "ppl": math.exp(nll / n), "top1_agreement": agree / n}, None


def dense_merge(cfg: TrainConfig, adapter: Path, like: torch.Tensor) -> Transformer:
    """The common mistake, for the report: the adapter merged into the base's original dense weights (loaded once
    more, in `like`'s dtype and device) instead of the dequantized NF4 ones it was trained on."""
    model = load_model(cfg.ckpt, dtype=like.dtype, device=like.device)
    resize_embeddings(model, like.shape[0])
    lora.load_adapter(model, adapter)
    return lora.merge_lora(model)


def merge_model(cfg: TrainConfig, model, tokenizer: Tokenizer, sample: tuple[str, list[dict]], dest: Path,
                adapter: Path) -> dict:
    """`model` (the adapter on the base it was trained on) -> the merged model in `dest` (--merge-layout, with the
    tokenizer files, chat template and generation config) and its report, merge_report.json. Each projection
    becomes a MergedLinear: an NF4 base is dequantized, the update added in fp32, kept dense."""
    w = model.tok_embeddings.weight
    nf4 = any(hasattr(m.base, "dequantize") for m in model.modules() if isinstance(m, lora.LoRALinear))
    on_base, ref = score(model, sample[1])
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, lora.LoRALinear):
                setattr(module, name, MergedLinear(child))
    model.lora_config = None
    report = {"layout": cfg.merge_layout, "sample": sample[0], "trained_tokens": len(ref),
              "positions": "trained (assistant) tokens", "dtype": DTYPE_NAMES[w.dtype], "kl_warn": KL_WARN[w.dtype],
              "base": "nf4" if nf4 else "dense",
              "adapter_on_base": on_base, "merged": score(model, sample[1], ref)[0]}
    if nf4:
        report["dense_merge"] = (score(dense_merge(cfg, adapter, w), sample[1], ref)[0] if cfg.report_dense_merge
                                 else "not measured (--no-report-dense-merge)")
    del ref
    save_model(model, dest, layout=cfg.merge_layout, tokenizer=tokenizer, template=cfg.template,
               max_shard_size=MERGED_SHARD_BYTES)
    (dest / "merge_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print_merge_report(report, dest)
    return report


def print_merge_report(report: dict, dest: Path) -> None:
    kl = report["merged"]["kl"]
    print(f"merge report: {report['sample']}, {report['trained_tokens']:,} trained tokens, {report['dtype']}")
    print(f"  {'model':<40} {'KL nats/token':>13} {'perplexity':>10} {'top-1 agree':>11}")
    base = "NF4 base (as trained)" if report["base"] == "nf4" else "base"
    rows = [(f"adapter on its {base}", report["adapter_on_base"]),
            ("merged" + (" (dequantized NF4 + update)" if report["base"] == "nf4" else ""), report["merged"])]
    if isinstance(report.get("dense_merge"), dict):
        rows.append(("dense base + update (the common mistake)", report["dense_merge"]))
    for label, r in rows:
        k, a = (f"{r['kl']:.2e}", f"{r['top1_agreement']:.1%}") if "kl" in r else ("-", "-")
        print(f"  {label:<40} {k:>13} {r['ppl']:>10.4f} {a:>11}")
    print(f"merged model ({report['layout']} layout) written to {dest}", flush=True)
    if kl > report["kl_warn"]:
        print(f"warning: the merged model {dest} is not the model that was trained: KL {kl:.2e} nats/token from the "
              f"adapter on its base, above {report['kl_warn']:g} for {report['dtype']}", file=sys.stderr, flush=True)


# ---- Several processes (torchrun): full fine-tuning shards every block with FSDP2; LoRA/QLoRA replicate the
# frozen base and all-reduce the adapters' gradients. Each optimizer step's rows are split across ranks,
# and the loss is normalised by the trained-token count of the whole global batch, so N processes compute
# exactly the gradient one process computes on the same global batch. torch.distributed's checkpoint and FSDP
# modules are imported where they are used: they are slow to import (they pull in torch._inductor), and only
# FSDP runs need them.


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    fsdp: bool = False

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def say(self, *a) -> None:
        """print() on rank 0 only (flushed: torchrun and log files buffer)."""
        if self.rank == 0:
            print(*a, flush=True)

    def share(self, obj):
        """Rank 0's `obj`, on every rank."""
        box = [obj]
        if self.world > 1:
            torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def init_distributed() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Dist(rank=torch.distributed.get_rank(), world=world)


def shard_model(model, dist: Dist, device: torch.device) -> None:
    """FSDP2: each block's parameters are split across ranks and gathered just in time."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.type, (dist.world,))
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    dist.fsdp = True


def all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Data-parallel adapters: sum the gradients of all ranks in one flat buffer (one collective)."""
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    torch.distributed.all_reduce(flat)
    for g, v in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(v.view_as(g))


def full_state_model(model, dist: Dist):
    """The unsharded model for saving (a collective under FSDP; rank 0 gets a plain Transformer)."""
    if not dist.fsdp:
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.rank != 0:
        return None
    with torch.device("meta"):
        plain = Transformer(model.args)
    plain.load_state_dict(sd, assign=True)
    plain.init_rope("cpu")
    return plain


# ---- The run: the stages above in order, and the loop.


@contextlib.contextmanager
def stop_on_signal():
    """SIGINT/SIGTERM set stop["signal"]: the loop finishes its step, saves a checkpoint and exits."""
    stop = {"signal": None}
    old = {s: signal.signal(s, lambda signum, _: stop.update(signal=signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def make_run(cfg: TrainConfig, dist: Dist, data: Data, device: torch.device, dtype: torch.dtype,
             out: Path) -> tuple[Run, bool]:
    """The model (loaded, quantized or not, adapted, sharded under torchrun for full fine-tuning), its optimizer
    and the schedule's sizes: (Run at step 0, whether the base is NF4)."""
    t0 = time.time()
    vocab_size = data.tokenizer.n_words if data.new_tokens else 0
    model, quantized = build_model(cfg, device, dtype, vocab_size, load_progress() if dist.rank == 0 else None)
    dist.say(f"model: loaded{' + NF4-quantized' if quantized else ''} in {time.time() - t0:.1f}s")
    if cfg.full and dist.world > 1:  # under torchrun, full fine-tuning shards every block (FSDP2)
        shard_model(model, dist, device)
    params = [p for p in model.parameters() if p.requires_grad]
    per_step = cfg.batch_size * cfg.grad_accum * dist.world  # rows per optimizer step
    steps_per_epoch = math.ceil(len(data.rows) / per_step)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    return Run(model, params, make_optimizer(cfg, params, device), device, dtype, dist, out, per_step,
               steps_per_epoch, total), quantized


def train(cfg: TrainConfig, dist: Dist) -> dict:
    """One run: the stages above in order, then the loop (learning rate, one step, the non-finite guard, eval,
    log, save) and the outputs. Returns what OUT/result.json holds."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    device, dtype = resolve_device_dtype(cfg.device, cfg.dtype, cfg.ckpt)
    out = check_out(cfg)
    dist.barrier()  # every rank has checked --out before rank 0 writes OUT/data into it
    data = load_data(cfg, out, dist)  # first: bad rows fail in seconds, before the model loads
    if cfg.prepare_data:
        if dist.rank == 0:
            (out / "data_stats.json").write_text(json.dumps(data.stats, indent=2))
        dist.say(f"data prepared in {data.folder}; train with the same flags and --out {out} (it is reused), or "
                 f"with --ckpt {cfg.ckpt} --data {data.folder} (it brings its --template and --seq-len)")
        return {"data": data.stats}

    run, quantized = make_run(cfg, dist, data, device, dtype, out)
    model, total, per_step, steps_per_epoch = run.model, run.total, run.per_step, run.steps_per_epoch
    start_run(cfg, run, data, quantized)
    gen_eval = read_gen_eval(cfg.gen_eval) if cfg.gen_eval and not dist.fsdp else None  # needs the whole model
    before = exact_match(model, data.tokenizer, gen_eval, cfg.template) if gen_eval and run.step == 0 else None

    model.train()
    bad_steps, last = 0, {}
    line = Progress("", log_every=0)  # the step line: rewritten in place on a terminal, every logged step in a log
    # OUT/metrics.jsonl (rank 0), line-buffered: each line reaches the file as it is written
    metrics = open(out / "metrics.jsonl", "a", buffering=1) if dist.rank == 0 else contextlib.nullcontext()
    with stop_on_signal() as stop, metrics as metrics_f:
        while run.step < total:
            t_step = time.time()
            lr = lr_at(run.step, total, cfg)
            loss, grad_norm = train_step(cfg, run, data, lr)
            run.step += 1
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                bad_steps += 1
                report_bad_step(cfg, run, metrics_f, lr, bad_steps, (loss, grad_norm))
                continue
            bad_steps = 0
            tokens_per_s = per_step * cfg.seq_len / (time.time() - t_step)
            last = {"step": run.step, "epoch": round(run.step / steps_per_epoch, 4), "loss": round(loss, 6), "lr": lr,
                    "grad_norm": round(grad_norm, 6), "tokens_per_s": round(tokens_per_s, 1),
                    "peak_mem_mb": round(peak_mem_mb(device), 1)}
            if data.val_rows is not None and ((cfg.eval_every and run.step % cfg.eval_every == 0) or run.step == total):
                last.update(evaluate(cfg, run, data))
            if metrics_f and (run.step % cfg.log_every == 0 or run.step == total or "eval_loss" in last):
                log_step(metrics_f, line, last, total)
            if (cfg.save_every and run.step % cfg.save_every == 0) or stop["signal"]:
                save_checkpoint(run, cfg.save_total_limit)
            if stop["signal"]:
                dist.say(f"\nstopped by signal {stop['signal']} at step {run.step}; checkpoint saved, --resume "
                         "continues")
                raise SystemExit(130)
    return write_outputs(cfg, run, data, last, gen_eval, before)


# ---- The command line: flags generated from TrainConfig; --chat; --merge --adapter; `python train.py` runs the demo
# (with any flags but --ckpt and --data on top of its own).


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (--help has the usage), naming the closest flag to a mistyped one."""

    def error(self, message: str):
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)

    def parse_args(self, args=None, namespace=None):
        ns, extra = self.parse_known_args(args, namespace)
        if extra:
            word = next((a for a in extra if a.startswith("-")), extra[0]).split("=")[0]
            near = difflib.get_close_matches(word, self._option_string_actions, n=1)
            self.error(f"unrecognized argument {word}" + (f"; did you mean {near[0]}?" if near else ""))
        return ns


def make_parser() -> ArgumentParser:
    """The CLI generated from TrainConfig, in its --help sections (`--lora-r 8`, `--no-packing`, `--data a b:0.5`),
    then llama.generate's chat flags. Flags are spelled out (no abbreviations), so given_flags can read them."""
    first, *_, examples = __doc__.split("\n\n")  # the module docstring's first line and its example commands
    p = ArgumentParser(usage="%(prog)s [--ckpt CKPT --data DATA [DATA ...]] [FLAG ...]", description=first + "\n\n" +
                       examples, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    group = p
    for f in dataclasses.fields(TrainConfig):
        option, h, section = "--" + f.name.replace("_", "-"), f.metadata["help"], f.metadata["section"]
        group = p.add_argument_group(section) if section else group
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if f.type == "bool":  # a flag that is on by default is turned off by --no-...
            group.add_argument("--no-" + option[2:] if default else option, dest=f.name,
                               action="store_false" if default else "store_true", help=h)
        elif f.type.startswith("list"):  # each --data adds its paths (none given: TrainConfig's default)
            group.add_argument(option, nargs="+", action="extend", help=h)
        else:
            h += " (default: %(default)s)" if default != "" else ""
            group.add_argument(option, default=default, type={"int": int, "float": float}.get(f.type, str),
                               choices=f.metadata["choices"], help=h)
    add_chat_args(p)
    return p


def given_flags(argv: list[str]) -> set[str]:
    """The fields a command line names: `--seq-len 64` -> "seq_len"."""
    return {a.split("=")[0][2:].replace("-", "_") for a in argv if a.startswith("--")}


def parse_args(argv: list[str]) -> tuple[TrainConfig, ChatOptions]:
    """The command line -> TrainConfig and the chat flags. Training with neither --ckpt nor --data is the demo: the
    given flags go on top of DEMO_FLAGS (the later flag wins). Given only one of the two, the other is missing."""
    p, given = make_parser(), given_flags(argv)
    args = p.parse_args(argv)
    command = args.chat or (args.merge and args.adapter)  # no training: --ckpt alone is the base
    if not command and not given & {"ckpt", "data"}:
        args = p.parse_args(DEMO_FLAGS + argv)
    elif not command and len(given & {"ckpt", "data"}) == 1:
        p.error(("--ckpt given without --data: name the data to fine-tune on (--data FILE ...)" if "ckpt" in given
                 else "--data given without --ckpt: name the model to fine-tune (--ckpt FOLDER or org/name)")
                + "; with neither, `python train.py` runs the demo")
    try:
        opts = chat_options(args)
    except ValueError as e:
        p.error(str(e))
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in values.items() if v is not None}), opts


def adapter_run(cfg: TrainConfig, given: set[str], keys: tuple[str, ...]) -> dict:
    """The run_config.json of the run that wrote --adapter (OUT/run_config.json beside OUT/adapter; {} for an adapter
    from elsewhere). Its values of `keys` replace cfg's, except those given on the command line."""
    file = Path(cfg.adapter).parent / "run_config.json"
    try:
        run = json.loads(file.read_text()) if cfg.adapter and file.is_file() else {}
    except (OSError, ValueError) as e:
        raise UserError(f"{file}: cannot be read as JSON ({e})") from None
    for k in keys:
        if k in run and k not in given:
            setattr(cfg, k, run[k])
    return run


def chat(cfg: TrainConfig, opts: ChatOptions, given: set[str]) -> None:
    """llama.generate's chat on the base model with --adapter on it, in the template and quantization the adapter's
    run trained with (its run_config.json) unless --template or --quant is given."""
    adapter_run(cfg, given, ("template", "quant"))
    device, dtype = resolve_device_dtype(cfg.device, cfg.dtype, cfg.ckpt)
    hook = quantize_hook(cfg, device, dtype)
    tok_dir = cfg.adapter if cfg.adapter and (Path(cfg.adapter) / "tokenizer.model").exists() else None
    try:
        model, tokenizer = load_chat_model(cfg.ckpt, cfg.template, device, dtype, tok_dir, hook, load_progress())
    except ValueError as e:
        raise UserError(str(e)) from None
    if cfg.adapter:
        lora.load_adapter(model, cfg.adapter)
    chat_loop(model, tokenizer, cfg.template, opts)


def merge_command(cfg: TrainConfig, given: set[str]) -> None:
    """`--merge --adapter DIR --out OUT`: a saved adapter (ours or PEFT's) merged into --ckpt, written to OUT with its
    report; no training. The base is loaded as the adapter was trained on it: NF4 when its run's run_config.json
    says so, else as --quant says (auto: dense); the run's template and dtype unless given. Every input is checked
    (the adapter against the base's shapes on the meta device, before the weights load) before OUT is written."""
    adapter, out = Path(cfg.adapter), Path(cfg.out)
    if "data" in given or "out" not in given:
        raise UserError("--merge --adapter merges a trained adapter instead of training: give --out (the folder for "
                        "the merged model) and no --data (the report's sample is --report-data FILE)")
    if not adapter.is_dir():
        raise UserError(f"--adapter {adapter}: no such folder")
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        if not (adapter / f).is_file():
            raise UserError(f"--adapter {adapter}: no {f} in it (expected a PEFT LoRA adapter folder)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not cfg.overwrite:
        raise UserError(f"--out {out} already exists; pass --overwrite to replace it, or choose another --out")
    trained = adapter_run(cfg, given, ("template", "dtype")).get("quant")  # "nf4" / "none" (runs before: "auto")
    if trained in ("nf4", "none") and "quant" in given and cfg.quant != trained:
        run_cfg = adapter.parent / "run_config.json"
        raise UserError(f"--quant {cfg.quant}: the adapter was trained on a {trained} base ({run_cfg}), and merged "
                        "into other weights it is another model; leave --quant out")
    nf4 = trained == "nf4" or (trained not in ("nf4", "none") and cfg.quant == "nf4")
    device, dtype = resolve_device_dtype(cfg.device, cfg.dtype, cfg.ckpt)
    tok_dir = adapter if (adapter / "tokenizer.model").is_file() else None
    print(f"merge: {adapter} into {cfg.ckpt} ({'NF4' if nf4 else DTYPE_NAMES[dtype]} base, template {cfg.template})")
    try:  # first on the meta device: the adapter against the base's shapes, in seconds and no memory
        shapes, tokenizer = load_chat_model(cfg.ckpt, cfg.template, "meta", dtype, tok_dir)
        lora.load_adapter(shapes, adapter)
        sample = command_sample(cfg, adapter, tokenizer, min(cfg.seq_len, shapes.args.max_seq_len))
        hook = quant.quantize_on_load(compute_dtype=dtype) if nf4 else None
        model, tokenizer = load_chat_model(cfg.ckpt, cfg.template, device, dtype, tok_dir, hook, load_progress())
        lora.load_adapter(model, adapter)
    except ValueError as e:
        raise UserError(str(e)) from None
    merge_model(cfg, model, tokenizer, sample, out, adapter)


def command_sample(cfg: TrainConfig, adapter: Path, tokenizer: Tokenizer, seq_len: int) -> tuple[str, list[dict]]:
    """The merge command's report sample: the corpus of the adapter's run (OUT/data beside OUT/adapter, as the in-run
    merge has it) unless --report-data, else that file or the demo's held-out chats, rendered in the template."""
    if not cfg.report_data and corpus.is_prepared(adapter.parent / "data"):
        return report_sample(corpus.open_corpus(adapter.parent / "data")[1], "the run's corpus")
    file = cfg.report_data or str(DEMO / "data" / "heldout.jsonl")
    opts = dataclasses.replace(data_options(cfg), seq_len=seq_len, val_split=0)
    with tempfile.TemporaryDirectory() as tmp:
        corpus.prepare_corpus([file], tokenizer, Path(tmp) / "sample", opts, workers=1)
        return report_sample(corpus.open_corpus(Path(tmp) / "sample")[1], file)


# `python train.py` (no --ckpt, no --data): QLoRA on the bundled tiny Llama (demo/make_demo.py builds it), then the
# before/after answers to held-out prompts; flags given go on top (`python train.py --merge`).
DEMO_FLAGS = ["--quant", "nf4", "--seq-len", "256", "--batch-size", "8", "--grad-accum", "1", "--lr", "2e-3",
              "--epochs", "16", "--lora-dropout", "0", "--gen-eval", str(DEMO / "data" / "heldout.jsonl"),
              "--out", "out/demo", "--overwrite"]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, chat_opts = parse_args(argv)
    fresh, dist = not Path(cfg.out).exists(), Dist()
    try:
        cfg.ckpt = str(resolve_checkpoint(cfg.ckpt))  # a repo id becomes its snapshot in the Hugging Face hub cache
        if cfg.chat:
            chat(cfg, chat_opts, given_flags(argv))
        elif cfg.merge and cfg.adapter:  # merge a saved adapter; --merge alone merges at the end of training
            merge_command(cfg, given_flags(argv))
        else:
            take_prepared_settings(cfg, given_flags(argv))
            dist = init_distributed()
            train(cfg, dist)
    except (UserError, CheckpointError, DataError) as e:
        out = Path(cfg.out)  # bad input leaves no trace: an --out this run created (at most the corpus in it) goes
        if fresh and dist.rank == 0 and out.is_dir() and all(p.name in PREPARED for p in out.iterdir()):
            shutil.rmtree(out, ignore_errors=True)
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.world > 1:
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
