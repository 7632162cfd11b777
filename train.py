"""Supervised fine-tuning of Llama 2 on chat data: full, LoRA or QLoRA, in one file.

Read top to bottom, it is the pipeline:

    data files -> dialogs -> chat template -> tokenized corpus on disk (OUT/data, llama.corpus)
    -> row plans packing it into rows of --seq-len -> micro-batches built when drawn
    -> model (Meta checkpoint -> NF4 quantize while loading -> LoRA) -> AdamW steps -> eval
    -> checkpoints -> PEFT adapter (and optionally a merged model)

The loss is next-token cross-entropy on assistant tokens only, averaged over every trained token of
an optimizer step (all micro-batches together), so gradient accumulation and packing do not change
what is optimised: a packed batch gives the same loss as its documents run one by one.

    python train.py                                 # the bundled demo: QLoRA on a tiny Llama, CPU
    python train.py --ckpt llama-2-7b --data chats.jsonl --quant nf4
    python train.py --prepare-data --ckpt llama-2-7b --data chats.jsonl --out out/run   # tokenize only
    python train.py --chat --ckpt llama-2-7b --adapter out/run/adapter
"""
from __future__ import annotations

import argparse
import dataclasses
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
import time
from dataclasses import dataclass, field
from pathlib import Path

# ---- Machine-specific process settings (the one place for them). They are read by MKL and c10 at first use,
# hence set before torch is imported; a value already in the environment wins. benchmarks/bench_train.py gives
# the HF baseline the same settings, and benchmarks/README.md has what they are worth.
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
from llama.export import save_tokenizer_files
from llama.generate import DTYPES, chat_loop, generate, load_chat_model, resolve_device_dtype
from llama.model import resize_embeddings

ROOT = Path(__file__).resolve().parent
DEMO = ROOT / "demo"


# ---- Configuration: the dataclass defaults are the documentation; the CLI is generated from it.


def opt(default, help: str = "", choices: tuple[str, ...] | None = None):
    """A TrainConfig field: its default, its --help text and the values argparse accepts."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    ckpt: str = opt(str(DEMO / "tiny-llama"), "Meta folder (consolidated.*.pth + params.json), HF folder, or org/name in the HF hub cache")
    data: list[str] = opt([str(DEMO / "data" / "train.jsonl")], "path[:fraction] ... or one prepared folder")
    template: str = opt("llama2", "chat template", TEMPLATES)
    out: str = "out/run"
    overwrite: bool = opt(False, "reuse an --out that holds another run")
    # model
    quant: str = opt("auto", "auto: nf4 on CUDA, none on CPU", ("none", "nf4", "auto"))
    full: bool = opt(False, "full fine-tuning instead of LoRA")
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_targets: str = "wq,wk,wv,wo,w1,w2,w3"
    rslora: bool = False
    dtype: str = opt("auto", "auto: bf16 on CUDA; on CPU fp32, bf16 for checkpoints over 2 GiB", ("auto", *DTYPES))
    device: str = "auto"
    grad_checkpointing: bool = False
    lima_dropout: float = opt(0.0, "residual dropout rising linearly with depth up to this value (LIMA)")
    init_adapter: str = opt("", "start from a saved adapter (second stage), fresh optimizer")
    # data
    seq_len: int = 1024
    packing: bool = True
    overlong: str = opt("truncate", "truncate or drop samples longer than --seq-len", ("truncate", "drop"))
    val_split: float = opt(0.0, "fraction of each file held out for eval")
    max_val: int = opt(1000, "cap on held-out samples per file")
    min_assistant_tokens: int = opt(1, "drop samples with fewer trained tokens")
    oasst_top_k: int = opt(0, "OASST threads whose assistant replies all rank below K (0: every thread)")
    oasst_lang: str = opt("", "comma-separated OASST languages to keep, e.g. en,de (\"\": all)")
    text_as_lm: bool = opt(False, "{\"text\"} rows without chat markers train on the whole text (plain language modelling)")
    bad_rows: str = opt("error", "a bad row stops the run, or is left out (counted; listed in OUT/data/skipped.jsonl)",
                        ("error", "skip"))
    max_bad_fraction: float = opt(0.01, "with --bad-rows skip: more bad rows than this share of a file is an error")
    prepare_data: bool = opt(False, "tokenize --data into OUT/data and exit (loads only the tokenizer)")
    data_workers: int = opt(0, "tokenizer processes (0: one per core)")
    show_samples: int = opt(0, "print this many prepared samples with the trained spans marked")
    # optimisation
    batch_size: int = opt(4, "rows per micro-batch")
    grad_accum: int = opt(4, "micro-batches per optimizer step")
    epochs: float = 1.0
    max_steps: int = opt(0, "> 0 overrides --epochs")
    lr: float = 2e-4
    min_lr: float = 0.0
    schedule: str = opt("cosine", "", ("cosine", "linear", "constant"))
    warmup_ratio: float = 0.05
    warmup_steps: int = opt(0, "> 0 overrides --warmup-ratio")
    optim: str = opt("adamw", "", ("adamw", "adamw_8bit", "paged_adamw_8bit"))
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = opt(0.3, "0 disables clipping")
    max_bad_steps: int = opt(5, "abort after this many non-finite steps in a row")
    seed: int = 0
    # logging, eval, checkpoints
    log_every: int = 1
    eval_every: int = opt(0, "0: eval only at the end (when there is a val split)")
    save_every: int = opt(0, "0: no intermediate checkpoints")
    save_total_limit: int = 2
    resume: bool = False
    merge: bool = opt(False, "also write the merged model to OUT/merged")
    merge_layout: str = opt("hf", "", ("meta", "hf"))
    gen_eval: str = opt("", "JSONL of dialogs whose last assistant turn is the expected answer")
    # chat with a result instead of training
    chat: bool = False
    adapter: str = ""


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Build the CLI from TrainConfig: `--lora-r 8`, `--no-packing`, `--data a.jsonl b.jsonl:0.5`."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        flag, h = "--" + f.name.replace("_", "-"), f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if f.type == "bool":
            p.add_argument("--no-" + flag[2:] if default else flag, dest=f.name, action="store_false" if default
                           else "store_true", help=h)
        else:
            p.add_argument(flag, nargs="+" if f.type.startswith("list") else None, default=default,
                           type={"int": int, "float": float}.get(f.type, str), choices=f.metadata.get("choices"),
                           help=f"{h} (default: %(default)s)".lstrip())
    return TrainConfig(**vars(p.parse_args(argv)))


class UserError(Exception):
    """Bad input from the user: printed as one paragraph, exit code 2, no traceback."""


# ---- Packing: samples -> rows of exactly seq_len tokens with labels and document ids.


def pack(samples: list[tuple[list[int], list[bool]]], seq_len: int, pad_id: int = 0,
         packing: bool = True) -> dict[str, torch.Tensor]:
    """Best-fit-decreasing bin packing of samples into rows of seq_len tokens (llama.corpus.pack_plan), all rows
    built at once: tokens/labels/doc_ids [R, seq_len]. Each sample keeps its own doc id within the row so the
    model isolates it; the padded tail is one more "document" whose labels are all -100. packing=False
    (--no-packing): one sample per row. (Training builds only the rows each micro-batch draws; this is the
    whole-corpus form, for tests and benchmarks.)"""
    split = corpus.split_from_samples(samples)
    rows = corpus.make_rows(split, seq_len, packing)
    return {k: torch.from_numpy(v) for k, v in corpus.build_batch(split, rows, range(len(rows)), seq_len, pad_id).items()}


def draw(split: corpus.Split, rows: corpus.Rows, which, cfg: TrainConfig, pad_id: int, device) -> dict[str, torch.Tensor]:
    """The micro-batch of rows `which`, built from the memory-mapped corpus and moved to the device."""
    b = corpus.build_batch(split, rows, which, cfg.seq_len, pad_id)
    return {k: torch.from_numpy(v).to(device) for k, v in b.items()}


# ---- Data: --data -> the prepared corpus (OUT/data, or a prepared folder given as --data).


def data_options(cfg: TrainConfig) -> corpus.DataOptions:
    return corpus.DataOptions(template=cfg.template, seq_len=cfg.seq_len, overlong=cfg.overlong,
                              min_assistant_tokens=cfg.min_assistant_tokens, val_split=cfg.val_split,
                              max_val=cfg.max_val, seed=cfg.seed, oasst_top_k=cfg.oasst_top_k,
                              oasst_lang=tuple(x.strip() for x in cfg.oasst_lang.split(",") if x.strip()),
                              text_as_lm=cfg.text_as_lm, bad_rows=cfg.bad_rows,
                              max_bad_fraction=cfg.max_bad_fraction)


def prepared_data(cfg: TrainConfig, tokenizer: Tokenizer, out: Path, dist_ctx: "Dist") -> tuple[Path, dict, dict]:
    """(folder, meta, splits) of the corpus this run trains on. A prepared folder given as the only --data is
    used as it is (checked against this run's tokenizer, template and --seq-len). Otherwise OUT/data: reused
    when its key (data file contents, tokenizer, options) matches this run's, written first when there is
    none or, on a fresh run, when it differs; on --resume a difference is an error (the checkpoint trained
    on the old one)."""
    given = len(cfg.data) == 1 and corpus.is_prepared(Path(cfg.data[0]))
    folder = Path(cfg.data[0]) if given else out / "data"
    if not given and dist_ctx.rank == 0:
        opts = data_options(cfg)
        key = corpus.corpus_key(cfg.data, tokenizer, opts)
        diff = corpus.key_difference(corpus.read_meta(folder)["key"], key) if corpus.is_prepared(folder) else None
        if diff == []:
            print(f"data: reusing {folder} (same data files, tokenizer and options)", flush=True)
        elif diff and cfg.resume:
            raise UserError(f"--resume: {folder} was prepared from other data or options than this run's (they "
                            f"differ in: {', '.join(diff)}), and the checkpoints trained on it. Resume with the same "
                            "--data and data flags, or start a new run (another --out, or --overwrite)")
        else:
            t0 = time.time()
            meta = corpus.prepare_corpus(cfg.data, tokenizer, folder, opts, workers=cfg.data_workers, key=key)
            print(f"data: prepared {folder} in {time.time() - t0:.1f}s ({meta['splits']['train']['tokens']:,} "
                  "training tokens)", flush=True)
    dist_ctx.barrier()
    meta, splits = corpus.open_corpus(folder, tokenizer)
    if given:
        template, seq_len = meta["key"].get("template"), meta["key"].get("seq_len", 0)
        if template != cfg.template:
            raise UserError(f"prepared data {folder} was rendered with --template {template}; "
                            f"pass --template {template} (this run has {cfg.template})")
        if seq_len > cfg.seq_len:
            raise UserError(f"prepared data {folder} holds samples of up to {seq_len} tokens "
                            f"(--seq-len {seq_len}); pass --seq-len {seq_len} or prepare it again")
        dist_ctx.say(f"data: the prepared folder {folder}", flush=True)
    return folder, meta, splits


# ---- Model: load base weights -> quantize (while streaming) -> add tokens -> LoRA.


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
    for i, block in enumerate(model.layers):  # LIMA: residual dropout rising linearly with depth (0: none)
        block.resid_dropout = cfg.lima_dropout * i / max(len(model.layers) - 1, 1)
    model.grad_checkpointing = cfg.grad_checkpointing
    if not cfg.full:  # (with --full every weight trains: load_model's parameters all require grad)
        extra = ("tok_embeddings", "output") if new_tokens else ()
        targets = tuple(t.strip() for t in cfg.lora_targets.split(",") if t.strip())
        lora.apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=targets,
                        rslora=cfg.rslora, modules_to_save=extra)
        if cfg.init_adapter:
            lora.load_adapter(model, cfg.init_adapter)
    return model, quantize


# ---- Loss: the model computes it (`Transformer.forward(..., labels=)`: the head only sees trained tokens).


def loss_sum(model, tokens, labels, doc_ids) -> torch.Tensor:
    """Sum of token losses of a batch (labels already shifted: labels[i] is the target after tokens[i])."""
    return model(tokens, doc_ids, labels=labels)


@torch.no_grad()
def evaluate(model, split: corpus.Split, rows: corpus.Rows, cfg: TrainConfig, pad_id: int, device) -> dict:
    model.eval()
    total = 0.0
    for s in range(0, len(rows), cfg.batch_size):
        b = draw(split, rows, np.arange(s, min(s + cfg.batch_size, len(rows))), cfg, pad_id, device)
        total += loss_sum(model, b["tokens"], b["labels"], b["doc_ids"]).item()
    model.train()
    loss = total / max(int(rows.targets.sum()), 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50))}


# ---- Optimiser and schedule.


def make_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter], device: torch.device):
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.optim == "adamw":
        return torch.optim.AdamW(params, fused=device.type == "cuda", **kw)
    import bitsandbytes as bnb  # paged falls back to unpaged memory off CUDA
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


# ---- Checkpoints: trainable weights + optimizer + RNG + position, written to a temp dir then renamed,
# so a crash at any moment leaves the previous checkpoint intact.


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

    def find_class(self, module: str, name: str):
        obj = super().find_class(module, name)
        ok = (module.startswith("torch.distributed.checkpoint.") and isinstance(obj, type)) \
            or (module == "torch" and (name == "Size" or isinstance(obj, torch.dtype))) \
            or (module == "torch.serialization" and name == "_get_layout") \
            or (module == "pathlib" and name in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")) \
            or (module == "collections" and name == "OrderedDict")
        if not ok:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")
        return obj


def check_dcp_metadata(file: Path) -> None:
    """CheckpointError unless `file` unpickles to nothing but checkpoint metadata (no code can run)."""
    try:
        with open(file, "rb") as f:
            _DCPMetadataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{file}: not checkpoint metadata this program wrote (only metadata classes are "
                              f"unpickled, never code): {e}") from None


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
            trainable = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
            state.update(model=trainable, optimizer=opt.state_dict())
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
    state = load_state(ck / "state.pt")
    if dist_ctx.fsdp:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        msd, osd = get_state_dict(model, opt)
        sd = {"model": msd, "optimizer": osd}
        check_dcp_metadata(ck / "dcp" / ".metadata")  # dcp.load unpickles it; the tensors it loads weights_only
        dcp.load(sd, checkpoint_id=str(ck / "dcp"))
        set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"])
        set_rng_state(load_state(ck / f"rng-rank{dist_ctx.rank}.pt")["rng"])
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


# ---- Generation-based eval (the demo's before/after exact match).


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
def exact_match(model, tokenizer, items, template: str, device, max_new_tokens: int = 48) -> tuple[float, list[str]]:
    prompts = [encode_chat(tokenizer, m, template, add_generation_prompt=True)[0] for m, _ in items]
    outs = generate(model, prompts, max_new_tokens, stop_ids=stop_ids(tokenizer, template))
    answers = [tokenizer.decode(o).strip() for o in outs]
    score = sum(a == want for a, (_, want) in zip(answers, items)) / max(len(items), 1)
    return score, answers


# ---- The output folder.


PREPARED = ("data", "data_stats.json")


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
    one = sum(p.numel() for p in params) * (4 + (2 if "8bit" in cfg.optim else 8)) + (1 << 20)
    need = one * ((cfg.save_total_limit + 1) if cfg.save_every else 1)
    free = shutil.disk_usage(out if out.exists() else out.parent if out.parent.exists() else Path(".")).free
    if free < need:
        raise UserError(f"--out {out}: {free / 2**30:.2f} GiB free on disk, but {need / 2**30:.2f} GiB are needed "
                        f"({cfg.save_total_limit} checkpoints of {one / 2**30:.2f} GiB "
                        "plus the final adapter); free space, lower --save-total-limit or choose another --out")


# ---- Several processes (torchrun): full fine-tuning shards every block with FSDP2; LoRA/QLoRA replicate the
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
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist_ctx.rank != 0:
        return None
    with torch.device("meta"):
        plain = Transformer(model.args)
    plain.load_state_dict(sd, assign=True)
    plain.init_rope("cpu")
    return plain


# ---- The pipeline: train() runs these stages in order.


def train(cfg: TrainConfig) -> dict:
    dist_ctx = init_distributed()
    fresh = not Path(cfg.out).exists()
    try:
        return _train(cfg, dist_ctx)
    except (UserError, CheckpointError, DataError):
        # bad input leaves no trace: an --out this run created (holding at most the prepared corpus) goes again
        out = Path(cfg.out)
        if fresh and dist_ctx.rank == 0 and out.is_dir() and all(p.name in PREPARED for p in out.iterdir()):
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        if dist_ctx.world > 1:
            torch.distributed.destroy_process_group()


def _train(cfg: TrainConfig, dist_ctx: Dist) -> dict:
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    device, dtype = resolve_device_dtype(cfg.device, cfg.dtype, cfg.ckpt)
    out = check_out(cfg)
    dist_ctx.barrier()  # every rank has checked --out before rank 0 writes OUT/data into it
    data = load_data(cfg, out, dist_ctx)  # first: bad rows fail in seconds, before the model loads
    if cfg.prepare_data:
        if dist_ctx.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / "data_stats.json").write_text(json.dumps(data.stats, indent=2))
            dist_ctx.say(f"data prepared in {data.folder}; train with the same flags and --out {out} (it is reused), "
                         f"or pass --data {data.folder}", flush=True)
        return {"data": data.stats}
    t0 = time.time()
    model, quantized = build_model(cfg, data.tokenizer, data.new_tokens, device, dtype,
                                   load_progress() if dist_ctx.rank == 0 else None)
    dist_ctx.say(f"model: loaded{' + NF4-quantized' if quantized else ''} in {time.time() - t0:.1f}s", flush=True)
    if cfg.full and dist_ctx.world > 1:  # under torchrun, full fine-tuning shards every block (FSDP2)
        shard_model(model, dist_ctx, device)
    run = setup_run(cfg, out, data, model, quantized, device, dtype, dist_ctx)
    gen_eval = read_gen_eval(cfg.gen_eval) if cfg.gen_eval and not dist_ctx.fsdp else None  # needs the whole model
    before = exact_match(model, data.tokenizer, gen_eval, cfg.template, device) if gen_eval and run.step == 0 else None

    stop = {"signal": None}  # SIGINT/SIGTERM: finish the step, save a checkpoint, exit

    def on_signal(signum, frame):
        stop["signal"] = signum
    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    # line-buffered: each metrics line reaches the file as it is written
    metrics_f = open(out / "metrics.jsonl", "a", buffering=1) if dist_ctx.rank == 0 else None
    model.train()
    bad_steps, last, t_start = 0, {}, time.time()
    try:
        while run.step < run.total:
            t_step = time.time()
            lr = lr_at(run.step, run.total, cfg)
            loss, grad_norm = train_step(cfg, model, run, data, lr)
            run.step += 1
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                bad_steps += 1
                skip_step(cfg, run, lr, loss, grad_norm, bad_steps, metrics_f)
                continue
            bad_steps = 0
            dt = time.time() - t_step
            last = log_eval_save(cfg, model, run, data, loss, grad_norm, lr, dt, t_start, metrics_f, stop)
    finally:
        if metrics_f:
            metrics_f.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
    return write_outputs(cfg, model, run, data, last, gen_eval, before)


@dataclass
class Data:
    """The corpus a run trains on: its splits (memory-mapped) and the row plans packing them."""
    tokenizer: Tokenizer
    new_tokens: list[str]
    folder: Path
    train: corpus.Split
    val: corpus.Split | None
    rows: corpus.Rows
    val_rows: corpus.Rows | None
    stats: dict


def load_data(cfg: TrainConfig, out: Path, dist_ctx: Dist) -> Data:
    """Tokenizer -> the prepared corpus on disk -> row plans; training builds each micro-batch when drawn."""
    tokenizer, new_tokens = load_tokenizer(cfg)
    folder, meta, splits = prepared_data(cfg, tokenizer, out, dist_ctx)
    train_split, val_split = splits["train"], splits.get("val")
    rows = corpus.make_rows(train_split, cfg.seq_len, cfg.packing)
    val_rows = corpus.make_rows(val_split, cfg.seq_len, cfg.packing) if val_split is not None else None
    efficiency = round(int(train_split.offsets[-1]) / (len(rows) * cfg.seq_len), 4)
    key_sha = hashlib.sha256(json.dumps(meta["key"], sort_keys=True).encode()).hexdigest()
    stats = {**meta["stats"], "rows": len(rows), "packing_efficiency": efficiency,
             "padding_fraction": round(1 - efficiency, 4), "train_samples": len(train_split),
             "val_samples": len(val_split) if val_split is not None else 0, "corpus": str(folder),
             "corpus_key_sha256": key_sha}
    if cfg.resume and (out / "data_stats.json").exists():  # also a prepared folder given as --data
        trained_on = json.loads((out / "data_stats.json").read_text()).get("corpus_key_sha256")
        if trained_on not in (None, key_sha):
            raise UserError(f"--resume: the corpus {folder} is not the one {out} trained on (its meta.json key "
                            "differs from the one recorded in data_stats.json); resume with that corpus, or start "
                            "a new run")
    if dist_ctx.rank == 0:
        print_stats(stats)
        if cfg.show_samples:
            print(corpus.show_samples(train_split, tokenizer, cfg.show_samples, color=sys.stdout.isatty()), flush=True)
    return Data(tokenizer, new_tokens, folder, train_split, val_split, rows, val_rows, stats)


@dataclass
class Run:
    """Where a run writes and computes, and its optimisation state: trainable params, optimizer, the schedule's
    length and the step reached."""
    out: Path
    device: torch.device
    dtype: torch.dtype
    dist: Dist
    params: list[torch.nn.Parameter]
    opt: torch.optim.Optimizer
    per_rank: int  # rows per optimizer step on each rank
    per_step: int  # rows per optimizer step, all ranks
    steps_per_epoch: int
    total: int  # optimizer steps
    step: int = 0


def setup_run(cfg: TrainConfig, out: Path, data: Data, model, quantized: bool, device: torch.device,
              dtype: torch.dtype, dist_ctx: Dist) -> Run:
    """Optimizer and schedule; OUT written (only now that every input is checked); resumed from its last checkpoint."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(cfg, params, device)
    if dist_ctx.rank == 0:
        check_disk(out, params, cfg)
        if cfg.overwrite and not cfg.resume and out.exists():  # the previous run goes; the corpus in use stays
            for p in out.iterdir():
                if p != data.folder:
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        out.mkdir(parents=True, exist_ok=True)
    dist_ctx.barrier()
    per_rank = cfg.batch_size * cfg.grad_accum
    per_step = per_rank * dist_ctx.world
    steps_per_epoch = math.ceil(len(data.rows) / per_step)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    run = Run(out, device, dtype, dist_ctx, params, opt, per_rank, per_step, steps_per_epoch, total)
    dist_ctx.say("\n".join(summary_lines(cfg, model, quantized, data, run)), flush=True)
    if cfg.resume and list_checkpoints(out):
        ck = out / f"checkpoint-{list_checkpoints(out)[-1]}"
        run.step = load_checkpoint(ck, model, opt, dist_ctx)
        dist_ctx.say(f"resumed from {ck} at step {run.step}", flush=True)
    if dist_ctx.rank == 0:
        if cfg.resume and (out / "metrics.jsonl").exists():  # drop lines logged after the checkpoint
            kept = [ln for ln in (out / "metrics.jsonl").read_text().splitlines() if json.loads(ln)["step"] <= run.step]
            (out / "metrics.jsonl").write_text("".join(ln + "\n" for ln in kept))
        (out / "run_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        (out / "data_stats.json").write_text(json.dumps(data.stats, indent=2))
    return run


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


def train_step(cfg: TrainConfig, model, run: Run, data: Data, lr: float) -> tuple[float, float]:
    """One optimizer step over step run.step's rows (this rank takes its share): (loss, gradient norm). The loss is
    normalised by the trained tokens of the whole global batch. A non-finite step is not applied."""
    idx = step_rows(cfg, run, len(data.rows))
    dist_ctx, device = run.dist, run.device
    n_target = int(data.rows.targets[idx.numpy()].sum())  # over the global batch, on every rank
    mine = idx[dist_ctx.rank * run.per_rank: (dist_ctx.rank + 1) * run.per_rank]
    for g in run.opt.param_groups:
        g["lr"] = lr
    autocast = torch.autocast("cuda", dtype=run.dtype) if device.type == "cuda" and run.dtype != torch.float32 \
        else torch.autocast(device.type, enabled=False)
    loss_total = torch.zeros((), device=device)
    for m in range(0, len(mine), cfg.batch_size):
        b = draw(data.train, data.rows, mine[m: m + cfg.batch_size].numpy(), cfg, data.tokenizer.eos_id, device)
        with autocast:
            loss = loss_sum(model, b["tokens"], b["labels"], b["doc_ids"]) / max(n_target, 1)
        # FSDP averages gradients over ranks; our loss is already normalised over the global batch
        (loss * dist_ctx.world if dist_ctx.fsdp else loss).backward()
        loss_total += loss.detach()
    if dist_ctx.world > 1:
        torch.distributed.all_reduce(loss_total)
        if not dist_ctx.fsdp:
            all_reduce_grads(run.params)
    loss_total = loss_total.item()
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    if math.isfinite(loss_total) and math.isfinite(grad_norm):
        run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    return loss_total, grad_norm


def skip_step(cfg: TrainConfig, run: Run, lr: float, loss: float, grad_norm: float, bad_steps: int, metrics_f) -> None:
    """A non-finite step: logged as skipped; too many in a row end the run."""
    if metrics_f:
        metrics_f.write(json.dumps({"step": run.step, "skipped": "non-finite loss or gradient", "loss": None,
                                    "lr": lr}) + "\n")
    run.dist.say(f"\nstep {run.step}: non-finite loss/gradient ({loss}, {grad_norm}); step skipped "
                 f"({bad_steps}/{cfg.max_bad_steps} in a row)", flush=True)
    if bad_steps >= cfg.max_bad_steps:
        raise UserError(f"{bad_steps} non-finite steps in a row at step {run.step}: the run diverged. "
                        "Lower --lr, use fp32/bf16 instead of fp16, or check the data.")


def peak_mem_mb(device) -> float:
    """Peak memory of this process: CUDA allocations on a GPU, else the peak resident set (Linux: in KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def log_eval_save(cfg: TrainConfig, model, run: Run, data: Data, loss: float, grad_norm: float, lr: float, dt: float,
                  t_start: float, metrics_f, stop: dict) -> dict:
    """After step run.step: eval when due, a metrics line and the console line when due, a checkpoint when due
    or when a signal asked to stop (then exit 130). Returns the step's metrics."""
    step, total, dist_ctx = run.step, run.total, run.dist
    last = {"step": step, "epoch": round(step / run.steps_per_epoch, 4), "loss": round(loss, 6), "lr": lr,
            "grad_norm": round(grad_norm, 6), "tokens_per_s": round(run.per_step * cfg.seq_len / dt, 1),
            "peak_mem_mb": round(peak_mem_mb(run.device), 1)}
    if data.val_rows is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == total):
        last.update(evaluate(model, data.val, data.val_rows, cfg, data.tokenizer.eos_id, run.device))
    if metrics_f and (step % cfg.log_every == 0 or step == total or "eval_loss" in last):
        metrics_f.write(json.dumps(last) + "\n")
        eta = (time.time() - t_start) / max(step, 1) * (total - step)
        ev = f" eval {last['eval_loss']:.4f}" if "eval_loss" in last else ""
        tty = sys.stdout.isatty()
        print(f"{chr(13) if tty else ''}step {step}/{total} loss {loss:.4f}{ev} lr {lr:.2e} {last['tokens_per_s']:.0f} "
              f"tok/s ETA {eta:.0f}s mem {last['peak_mem_mb'] / 1024:.1f}GiB   ",
              end="\n" if (not tty or step == total or ev) else "", flush=True)
    if (cfg.save_every and step % cfg.save_every == 0) or stop["signal"]:
        save_checkpoint(run.out, step, model, run.opt, cfg.save_total_limit, dist_ctx)
    if stop["signal"]:
        dist_ctx.say(f"\nstopped by signal {stop['signal']} at step {step}; checkpoint saved, --resume continues", flush=True)
        raise SystemExit(130)
    return last


def write_outputs(cfg: TrainConfig, model, run: Run, data: Data, last: dict, gen_eval, before) -> dict:
    """The adapter (or the full model), the gen-eval answers, the merged model, the loss curve, result.json."""
    out, dist_ctx, tokenizer = run.out, run.dist, data.tokenizer
    result = {"steps": run.step, "final": last, "data": data.stats}
    if cfg.full:
        plain = full_state_model(model, dist_ctx)
        if dist_ctx.rank == 0:
            save_model(plain, out / "model", layout="meta", tokenizer=tokenizer, template=cfg.template)
    elif dist_ctx.rank == 0:
        lora.save_adapter(model, out / "adapter")
        save_tokenizer_files(tokenizer, out / "adapter", cfg.template, model=False, max_length=model.args.max_seq_len)
    if gen_eval:
        after = exact_match(model, tokenizer, gen_eval, cfg.template, run.device)
        result.update(exact_match_before=before[0] if before else None, exact_match_after=after[0])
        if dist_ctx.rank == 0:
            print_gen_eval(gen_eval, before, after)
    if cfg.merge and not cfg.full and dist_ctx.rank == 0:
        lora.merge_lora(model)
        save_model(model, out / "merged", layout=cfg.merge_layout, tokenizer=tokenizer, template=cfg.template)
        print(f"merged model ({cfg.merge_layout} layout) written to {out / 'merged'}")
    if dist_ctx.rank == 0:
        plot_loss(out)
        (out / "result.json").write_text(json.dumps(result, indent=2))
        print(f"done: {run.step} steps; outputs in {out}", flush=True)
    dist_ctx.barrier()
    return result


# ---- What a run prints.


def summary_lines(cfg: TrainConfig, model, quantized: bool, data: Data, run: Run) -> list[str]:
    """What this run is, in a few lines (the full config goes to OUT/run_config.json)."""
    with torch.device("meta"):  # the architecture's parameter count, whatever quantization did to the modules
        n_params = sum(p.numel() for p in Transformer(model.args).parameters())
    a = model.args
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
    n_train, n_total = lora.count_parameters(model)
    precision = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[run.dtype]
    stats, n_tokens, out = data.stats, int(data.train.offsets[-1]), run.out
    total, per_epoch, per_step = run.total, run.steps_per_epoch, run.per_step
    return [
        f"run: {mode}; {precision} on {run.device}" + (f"; {run.dist.world} processes" if run.dist.world > 1 else ""),
        f"  trainable params: {n_train:,} of {n_total:,} ({100 * n_train / n_total:.3f}%)",
        f"  model:  {cfg.ckpt} ({layout} layout, {_count(n_params)} parameters: {a.n_layers} layers, dim {a.dim}, "
        f"vocab {a.vocab_size}; {f'{disk / 1e9:.1f} GB' if disk >= 1e9 else f'{disk / 1e6:.1f} MB'} of weights)",
        f"  data:   {stats['train_samples']:,} samples, {n_tokens:,} tokens -> {stats['rows']:,} rows of {cfg.seq_len} "
        f"tokens{' (packed)' if cfg.packing else ''}" + (f"; {stats['val_samples']:,} held out" if stats["val_samples"] else ""),
        f"  steps:  {total:,} ({total / per_epoch:.3g} epochs of {per_epoch:,} steps x {per_step:,} rows), "
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
    ax.set(xlabel="step", ylabel="loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)
    plt.close(fig)


# ---- Chat with a base model + adapter.


def chat(cfg: TrainConfig, argv: list[str]) -> None:
    """llama.generate's chat on the base model, NF4-quantized as --quant says, with --adapter on it; the template
    is the adapter's run's unless --template is given."""
    device, dtype = resolve_device_dtype(cfg.device, cfg.dtype, cfg.ckpt)
    run_cfg = Path(cfg.adapter).parent / "run_config.json" if cfg.adapter else None
    if run_cfg and run_cfg.exists() and not any(a == "--template" or a.startswith("--template=") for a in argv):
        cfg.template = json.loads(run_cfg.read_text())["template"]
    quantize = cfg.quant == "nf4" or (cfg.quant == "auto" and device.type == "cuda")
    hook = quant.quantize_on_load(compute_dtype=dtype) if quantize else None
    tok_dir = cfg.adapter if cfg.adapter and (Path(cfg.adapter) / "tokenizer.model").exists() else None
    try:
        model, tokenizer = load_chat_model(cfg.ckpt, cfg.template, device, dtype, tok_dir, hook, load_progress())
    except ValueError as e:
        raise UserError(str(e)) from None
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
            chat(cfg, argv)
        else:
            train(cfg)
    except (UserError, CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
