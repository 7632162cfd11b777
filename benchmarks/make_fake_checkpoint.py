"""Write a random Llama 2 checkpoint in Meta's exact layout, streaming, so full-size runs need no download.

    python benchmarks/make_fake_checkpoint.py --size 7b --out /tmp/llama-2-7b
    python benchmarks/make_fake_checkpoint.py --size 13b --out /tmp/l13 --scale 0.0625   # a tiny 2-shard one

The folder is what Meta's `download.sh` gives, with random weights:

    consolidated.NN.pth   one per model-parallel rank as Meta ships them (7B: 1, 13B: 2, 70B: 8), bf16,
                          Meta's key names (`tok_embeddings.weight`, `layers.N.attention.wq.weight`, ...,
                          `rope.freqs`), each matrix split the way Meta's tensor-parallel layers hold it:
                              column-parallel  wq wk wv w1 w3 output   rows split      (dim 0)
                              row-parallel     wo w2 tok_embeddings    columns split   (dim 1)
                              norms, rope.freqs                        replicated in every shard
    params.json           Meta's, byte for byte at --scale 1 (vocab_size -1: "from the weights")
    checklist.chk         md5sums, as Meta ships them
    tokenizer.model       a copy of --tokenizer; its vocabulary size is the embedding's row count

Values: every matrix ~ N(0, 0.02^2) (the usual init scale, so a forward pass stays numerically tame),
norm weights 1, rope.freqs = theta^(-2i/head_dim) as Meta stores them. Seeded per (tensor, shard), so a
folder is reproducible and independent of the order it is written in.

Streaming, so peak memory is one layer, not the model: each shard is first written by `torch.save` under
`torch.serialization.skip_data` from FakeTensors (the zip's pickle and record headers, with the data regions
left as a sparse hole), then reopened one layer at a time with `torch.load(mmap=True)` on a MAP_SHARED
mapping and filled in place. Writes go straight to the page cache; the mapping (and the resident pages it
counts) is dropped after every layer. The result is an ordinary `torch.save` file.

--scale F (< 1) keeps the architecture's shape rules (heads, shards, GQA groups, vocabulary) and shrinks
head_dim (128 F), n_layers and multiple_of by F: a 13B layout at F = 1/16 has dim 320, 2 layers.
"""
import argparse
import hashlib
import json
import math
import mmap
import os
import resource
import shutil
import sys
import time
import zlib
from pathlib import Path

import torch
from sentencepiece import SentencePieceProcessor
from torch._subclasses.fake_tensor import FakeTensorMode

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TOKENIZER = ROOT.parent / "shared" / "fixtures" / "llama2-tokenizer.model"

# params.json exactly as in Meta's Llama 2 downloads (key order included), and the shard count Meta used.
SIZES = {
    "7b": ({"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05, "vocab_size": -1}, 1),
    "13b": ({"dim": 5120, "multiple_of": 256, "n_heads": 40, "n_layers": 40, "norm_eps": 1e-05, "vocab_size": -1}, 2),
    "70b": ({"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64, "n_kv_heads": 8,
             "n_layers": 80, "norm_eps": 1e-05, "vocab_size": -1}, 8),
}
COLUMN_PARALLEL = ("wq", "wk", "wv", "w1", "w3", "output")  # rows split across shards
ROW_PARALLEL = ("wo", "w2", "tok_embeddings")  # columns split across shards
STD = 0.02


def scaled_params(size: str, scale: float = 1.0) -> tuple[dict, int]:
    """(params.json, number of shards) for a size, shrunk by `scale` (see the module docstring)."""
    if size not in SIZES:
        raise ValueError(f"--size {size!r}: expected one of {', '.join(SIZES)}")
    if not 0 < scale <= 1:
        raise ValueError(f"--scale {scale}: expected a factor in (0, 1]")
    params, shards = dict(SIZES[size][0]), SIZES[size][1]
    if scale < 1:
        head_dim = 2 * max(1, round(64 * scale))  # even, for RoPE's pairs
        params["dim"] = params["n_heads"] * head_dim
        params["n_layers"] = max(1, round(params["n_layers"] * scale))
        params["multiple_of"] = max(shards, round(params["multiple_of"] * scale / shards) * shards)
    return params, shards


def ffn_hidden(params: dict) -> int:
    """Meta's FeedForward width: 2/3 * 4 * dim, times ffn_dim_multiplier, rounded up to multiple_of."""
    hidden = int(2 * 4 * params["dim"] / 3)
    if params.get("ffn_dim_multiplier") is not None:
        hidden = int(params["ffn_dim_multiplier"] * hidden)
    m = params["multiple_of"]
    return m * ((hidden + m - 1) // m)


def full_shapes(params: dict, vocab: int) -> dict[str, tuple[int, ...]]:
    """Meta name -> merged (unsharded) shape, in the order of Meta's files."""
    dim, n_heads = params["dim"], params["n_heads"]
    hd, n_kv, hidden = dim // n_heads, params.get("n_kv_heads", n_heads), ffn_hidden(params)
    shapes = {"tok_embeddings.weight": (vocab, dim), "norm.weight": (dim,), "output.weight": (vocab, dim)}
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        shapes.update({p + "attention.wq.weight": (n_heads * hd, dim), p + "attention.wk.weight": (n_kv * hd, dim),
                       p + "attention.wv.weight": (n_kv * hd, dim), p + "attention.wo.weight": (dim, n_heads * hd),
                       p + "feed_forward.w1.weight": (hidden, dim), p + "feed_forward.w2.weight": (dim, hidden),
                       p + "feed_forward.w3.weight": (hidden, dim),
                       p + "attention_norm.weight": (dim,), p + "ffn_norm.weight": (dim,)})
    shapes["rope.freqs"] = (hd // 2,)
    return shapes


def split_dim(name: str) -> int | None:
    """The dimension Meta split `name` along across model-parallel shards; None: replicated."""
    kind = name.split(".")[-2] if name.endswith(".weight") else name
    return 0 if kind in COLUMN_PARALLEL else 1 if kind in ROW_PARALLEL else None


def shard_shape(name: str, shape: tuple[int, ...], shards: int) -> tuple[int, ...]:
    d = split_dim(name)
    if d is None or shards == 1:
        return shape
    if shape[d] % shards:
        raise ValueError(f"{name} {shape}: dim {d} does not split into {shards} shards")
    return tuple(n // shards if i == d else n for i, n in enumerate(shape))


def fill(name: str, t: torch.Tensor, shard: int, seed: int, head_dim: int) -> None:
    """Write tensor `name`'s values for `shard` into t (a view of the memory-mapped file)."""
    if name == "rope.freqs":  # Meta's stored RoPE frequencies, theta = 10000
        t.copy_(1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)))
    elif name.endswith("norm.weight"):
        t.fill_(1.0)
    else:
        g = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}:{shard}".encode()))
        t.normal_(0.0, STD, generator=g)  # straight into the mapped pages: no temporary


def _groups(names: list[str]) -> list[list[str]]:
    """A layer's tensors together; every top-level tensor alone (the embedding is the largest piece)."""
    out: list[list[str]] = []
    for n in names:
        key = ".".join(n.split(".")[:2]) if n.startswith("layers.") else n
        if out and out[-1][0].startswith("layers.") and ".".join(out[-1][0].split(".")[:2]) == key:
            out[-1].append(n)
        else:
            out.append([n])
    return out


def write_shard(file: Path, shapes: dict[str, tuple[int, ...]], shard: int, seed: int, head_dim: int) -> None:
    """One consolidated.NN.pth: the skeleton from FakeTensors, then the data a layer at a time."""
    tmp = file.with_name(file.name + ".tmp")
    with FakeTensorMode():
        skeleton = {n: torch.empty(s, dtype=torch.bfloat16) for n, s in shapes.items()}
    with torch.serialization.skip_data(materialize_fake_tensors=True):
        torch.save(skeleton, tmp)  # data regions are left as holes in a sparse file
    del skeleton
    for group in _groups(list(shapes)):
        with torch.serialization.set_default_mmap_options(mmap.MAP_SHARED):  # writes reach the file
            sd = torch.load(tmp, mmap=True, weights_only=True)
        for name in group:
            fill(name, sd[name], shard, seed, head_dim)
        del sd  # unmaps: only this group's pages were ever resident in this process
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, file)


def _md5(file: Path) -> str:
    h = hashlib.md5()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def make_checkpoint(size: str, out: str | Path, scale: float = 1.0, seed: int = 0,
                    tokenizer: str | Path = DEFAULT_TOKENIZER, checklist: bool = True, quiet: bool = False) -> Path:
    """Write the folder; returns its path. Refuses to overwrite existing shards."""
    out, tokenizer = Path(out), Path(tokenizer)
    if not tokenizer.is_file():
        raise ValueError(f"--tokenizer {tokenizer} does not exist: pass Meta's Llama 2 tokenizer.model (the "
                         "checkpoint's vocabulary size comes from it; a 32,000-piece model is what Llama 2 uses)")
    vocab = SentencePieceProcessor(model_file=str(tokenizer)).vocab_size()
    params, shards = scaled_params(size, scale)
    if params["n_heads"] % shards or params.get("n_kv_heads", params["n_heads"]) % shards:
        raise ValueError(f"{size}: heads do not split into {shards} shards")
    shapes = full_shapes(params, vocab)
    head_dim = params["dim"] // params["n_heads"]
    copies = {n: 1 if split_dim(n) is not None else shards for n in shapes}  # replicated tensors: in every shard
    nbytes = sum(math.prod(s) * 2 * copies[n] for n, s in shapes.items())
    if out.exists() and any(out.glob("consolidated.*.pth")):
        raise ValueError(f"--out {out} already holds consolidated.*.pth files; remove them or choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out).free
    if free < nbytes * 1.02:
        raise ValueError(f"--out {out}: {free / 1e9:.1f} GB free, the checkpoint needs {nbytes / 1e9:.1f} GB")

    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    say(f"{size} x{scale}: dim {params['dim']}, {params['n_layers']} layers, ffn {ffn_hidden(params)}, vocab {vocab}, "
        f"{sum(math.prod(s) for n, s in shapes.items() if n != 'rope.freqs'):,} parameters, "
        f"{shards} shard(s), {nbytes / 1e9:.2f} GB -> {out}")
    t0 = time.time()
    files = []
    for s in range(shards):
        file = out / f"consolidated.{s:02d}.pth"
        write_shard(file, {n: shard_shape(n, shp, shards) for n, shp in shapes.items()}, s, seed, head_dim)
        files.append(file)
        say(f"  wrote {file.name} ({file.stat().st_size / 1e9:.2f} GB) at {time.time() - t0:.0f}s")
    (out / "params.json").write_text(json.dumps(params))
    shutil.copyfile(tokenizer, out / "tokenizer.model")
    if checklist:
        lines = [f"{_md5(f)}  {f.name}" for f in [*files, out / "params.json"]]
        (out / "checklist.chk").write_text("\n".join(lines) + "\n")
    say(f"done in {time.time() - t0:.0f}s; peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", required=True, choices=tuple(SIZES))
    p.add_argument("--out", required=True, help="folder to write (not inside the repository: 7B is 13.5 GB)")
    p.add_argument("--scale", type=float, default=1.0, help="shrink head_dim, layers, multiple_of by this factor")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER), help="Llama 2 tokenizer.model to copy in")
    p.add_argument("--no-checklist", action="store_true", help="skip checklist.chk (md5 re-reads every shard)")
    a = p.parse_args(argv)
    try:
        make_checkpoint(a.size, a.out, a.scale, a.seed, a.tokenizer, checklist=not a.no_checklist)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
