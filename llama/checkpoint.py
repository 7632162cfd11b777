"""Loading Llama 2 checkpoints: Meta's layout and Hugging Face's (writing them is `llama.export`).

Meta layout (what `download.sh` gives): a folder with `params.json` (dim, n_layers, n_heads, n_kv_heads,
vocab_size (-1: from the weights), multiple_of, ffn_dim_multiplier, norm_eps) and `consolidated.NN.pth`,
one per model-parallel rank (7B: 1, 13B: 2, 70B: 8). Meta split each matrix the way its tensor-parallel
layers use it, so merging undoes that split:
    column-parallel (output rows split):  wq, wk, wv, w1, w3, output   -> concatenate along dim 0
    row-parallel (input columns split):   wo, w2                        -> concatenate along dim 1
    tok_embeddings (ParallelEmbedding splits the embedding dim)          -> concatenate along dim 1
    norms                                                                 -> replicated, take shard 0
`rope.freqs` is a precomputed buffer that we recompute, so it is ignored.

Hugging Face layout: `config.json` + `model.safetensors` (or `model-0000k-of-0000n.safetensors` and
`model.safetensors.index.json`). Names differ (`model.layers.0.self_attn.q_proj` = `layers.0.attention.wq`)
and so does RoPE: Meta rotates interleaved pairs (x_2i, x_2i+1), HF rotates halves (x_i, x_i+D/2). Both
compute the same attention scores if the rows of wq and wk are permuted inside each head so that
    HF row  j * D/2 + i  =  Meta row  2i + j        (i < D/2, j in {0, 1})
which is `permute_for_hf` (`unpermute_from_hf` is its inverse; `rotary_heads` says which tensors it applies to,
for the loader, `llama.export` and LoRA's PEFT export alike). Scores q·k are sums over the pairs, so
renumbering the pairs the same way in q and k changes nothing else.

Loading streams: the model is built on the `meta` device (no memory), files are opened with
`torch.load(mmap=True)` / safetensors' lazy `safe_open`, and each tensor in turn is merged across shards,
cast, moved to the device, passed to an optional `hook` and assigned. Peak memory stays near one copy
of the model in the target dtype.

A checkpoint argument that is not an existing path but reads like a Hugging Face repo id
("meta-llama/Llama-2-7b-hf", optionally "@revision") names a download already in the local hub cache,
found offline (`resolve_checkpoint`). The cache is plain folders:
    <cache>/models--{org}--{name}/refs/{branch}      the commit hash that branch points to
    <cache>/models--{org}--{name}/snapshots/{hash}/  the repo's files (symlinks into ../../blobs/)
"""
import difflib
import json
import os
import pickle
import re
from collections.abc import Callable, Iterable
from itertools import groupby
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from .model import ModelArgs, Transformer
from .tokenizer import Tokenizer


class CheckpointError(ValueError):
    """A checkpoint folder or file is missing, malformed, or disagrees with its own config."""

# ---------------------------------------------------------------------------------------------------
# Hugging Face names and the q/k row permutation
# ---------------------------------------------------------------------------------------------------

_LAYER_META_TO_HF = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_META_TO_HF = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
_LAYER_HF_TO_META = {v: k for k, v in _LAYER_META_TO_HF.items()}
_TOP_HF_TO_META = {v: k for k, v in _TOP_META_TO_HF.items()}


def _alternatives(names) -> str:
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))


_META_LAYER_RE = re.compile(rf"^layers\.(\d+)\.({_alternatives(_LAYER_META_TO_HF)})((?:\..+)?)$")
_META_TOP_RE = re.compile(rf"^({_alternatives(_TOP_META_TO_HF)})((?:\..+)?)$")
_HF_LAYER_RE = re.compile(rf"^model\.layers\.(\d+)\.({_alternatives(_LAYER_HF_TO_META)})((?:\..+)?)$")
_HF_TOP_RE = re.compile(rf"^({_alternatives(_TOP_HF_TO_META)})((?:\..+)?)$")


def meta_to_hf_key(name: str) -> str:
    """"layers.0.attention.wq[.weight]" -> "model.layers.0.self_attn.q_proj[.weight]"; a suffix after the
    module name (".weight", ".lora_A.weight") is kept as is."""
    if m := _META_LAYER_RE.match(name):
        return f"model.layers.{m[1]}.{_LAYER_META_TO_HF[m[2]]}{m[3]}"
    if m := _META_TOP_RE.match(name):
        return f"{_TOP_META_TO_HF[m[1]]}{m[2]}"
    raise ValueError(f"not a Llama parameter/module name in Meta's layout: {name!r}")


def hf_to_meta_key(name: str) -> str:
    """"model.layers.0.self_attn.q_proj[.weight]" -> "layers.0.attention.wq[.weight]"."""
    if m := _HF_LAYER_RE.match(name):
        return f"layers.{m[1]}.{_LAYER_HF_TO_META[m[2]]}{m[3]}"
    if m := _HF_TOP_RE.match(name):
        return f"{_TOP_HF_TO_META[m[1]]}{m[2]}"
    raise ValueError(f"not a Llama parameter/module name in Hugging Face's layout: {name!r}")


def rotary_heads(args: ModelArgs, name: str) -> int | None:
    """The heads HF's rotary permutation splits the rows of `name` into: n_heads for wq, n_kv_heads for wk
    (a module name or one of its tensors, "layers.0.attention.wk[.weight]"), None for every other tensor."""
    m = _META_LAYER_RE.match(name)
    return {"attention.wq": args.n_heads, "attention.wk": args.n_kv_heads}.get(m[2]) if m else None


def permute_for_hf(w: Tensor, n_heads: int) -> Tensor:
    """Meta -> HF row order of wq (n_heads) or wk (pass n_kv_heads): within each head, Meta row 2i + j goes
    to HF row j * D/2 + i. w: [n_heads * D, ...] (a weight, a LoRA B matrix, a bias)."""
    return _permute_rows(w, n_heads, to_hf=True)


def unpermute_from_hf(w: Tensor, n_heads: int, out: Tensor | None = None) -> Tensor:
    """HF -> Meta row order, the inverse of `permute_for_hf`. With `out` (same shape, any dtype or device) the
    rows are copied straight into it, with no temporary."""
    return _permute_rows(w, n_heads, to_hf=False, out=out)


def _permute_rows(w: Tensor, n_heads: int, to_hf: bool, out: Tensor | None = None) -> Tensor:
    D = w.shape[0] // n_heads
    assert n_heads * D == w.shape[0] and D % 2 == 0, f"{tuple(w.shape)} rows do not split into {n_heads} heads"
    split = (D // 2, 2) if to_hf else (2, D // 2)  # rows of a head as [pair i, j] (Meta) or [j, i] (HF)
    moved = w.reshape(n_heads, *split, *w.shape[1:]).transpose(1, 2)
    if out is None:
        return moved.reshape(w.shape)
    out.view(moved.shape).copy_(moved)
    return out


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------

Hook = Callable[[str, Tensor], "Tensor | nn.Module"]
_COLUMN_PARALLEL = ("wq", "wk", "wv", "w1", "w3", "output")  # Meta split their output rows: cat dim 0
_ROW_PARALLEL = ("wo", "w2", "tok_embeddings")  # split along the input (embedding) dim: cat dim 1
_IGNORED_META = ("rope.freqs",)  # a precomputed RoPE buffer in Meta's files; we recompute it


# org/name[@revision], as the Hub spells repo ids (letters, digits, "-", "_", "."; a revision may hold "/")
_REPO_ID_RE = re.compile(r"^([A-Za-z0-9][\w.-]*)/([A-Za-z0-9][\w.-]*)(?:@([\w./-]+))?$")


def hub_cache_dirs() -> list[Path]:
    """The Hugging Face hub cache folders, in huggingface_hub's order of precedence: $HF_HUB_CACHE (or its
    old name $HUGGINGFACE_HUB_CACHE), $HF_HOME/hub, $XDG_CACHE_HOME/huggingface/hub, ~/.cache/huggingface/hub.
    All that are set are searched, so a download made under another setting is still found."""
    env = os.environ
    dirs = [env.get("HF_HUB_CACHE"), env.get("HUGGINGFACE_HUB_CACHE"),
            env.get("HF_HOME") and Path(env["HF_HOME"]) / "hub",
            env.get("XDG_CACHE_HOME") and Path(env["XDG_CACHE_HOME"]) / "huggingface" / "hub",
            Path.home() / ".cache" / "huggingface" / "hub"]
    return list(dict.fromkeys(Path(d).expanduser() for d in dirs if d))


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder that `path` names. An existing path is returned as is. Otherwise, if it reads
    like a Hugging Face repo id, "org/name" or "org/name@revision" (a branch or tag under refs/, or a commit
    hash), the matching snapshot in the local hub cache (`hub_cache_dirs`; no network). CheckpointError
    when there is none: it says first that the folder does not exist, then which cache folders it tried; for a
    path that reads as local (not a repo id, or its parent folder exists: "demo/tiny_llama") it names the
    closest folder beside it instead."""
    p = Path(path)
    if p.exists():
        return p
    m = _REPO_ID_RE.match(str(path))
    if m is None or ".." in str(path):
        raise _missing_folder(path)
    org, name, revision = m[1], m[2], m[3] or "main"
    repo_id, partial = f"{org}/{name}", None
    repos = [cache / f"models--{org}--{name}" for cache in hub_cache_dirs()]
    for repo in repos:
        if not repo.is_dir():
            continue
        ref = repo / "refs" / revision
        commit = ref.read_text().strip() if ref.is_file() else revision
        snapshot = repo / "snapshots" / commit
        if snapshot.is_dir():
            return snapshot
        snapshots = sorted((repo / "snapshots").glob("*"))  # (glob finds nothing in a missing folder)
        if revision == "main" and not ref.exists() and len(snapshots) == 1:  # downloaded by commit only: unambiguous
            return snapshots[0]
        refs = sorted(f.name for f in (repo / "refs").glob("*"))
        have = [s.name for s in snapshots]
        partial = partial or CheckpointError(
            f"checkpoint folder {path} does not exist; the Hugging Face hub cache has {repo}, but no snapshot for "
            f"revision {revision!r} in it (refs: {refs or 'none'}, snapshots: {have or 'none'}). Download it with "
            f"`huggingface-cli download {repo_id} --revision {revision}`, or pass the checkpoint's folder")
    if partial is not None:
        raise partial
    if p.parent.is_dir():  # a local folder mistyped ("demo/tiny_llama"), not a repo id
        raise _missing_folder(path)
    raise CheckpointError(f"checkpoint folder {path} does not exist, and {repo_id} is not in the Hugging Face hub "
                          "cache either; looked for:\n" + "".join(f"  {r}\n" for r in repos)
                          + f"Download it with `huggingface-cli download {repo_id}` (the cache folder is "
                          "$HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub), or pass the "
                          "checkpoint's folder")


def _missing_folder(path: str | Path) -> CheckpointError:
    """"does not exist", naming the folder beside it whose name is closest, when one is close (a typo)."""
    msg, p = f"checkpoint folder {path} does not exist", Path(path)
    try:
        names = [d.name for d in p.parent.iterdir() if d.is_dir() and not d.name.startswith(".")]
    except OSError:  # the parent does not exist either (or cannot be listed)
        return CheckpointError(msg)
    near = difflib.get_close_matches(p.name, names, n=1)
    return CheckpointError(msg + (f"; did you mean {p.parent / near[0]}?" if near else ""))


def weights_size(path: str | Path) -> int:
    """Bytes of weight files (.pth, .safetensors, .bin) directly in the checkpoint folder `path`."""
    return sum(f.stat().st_size for f in Path(path).glob("*") if f.suffix in (".pth", ".safetensors", ".bin"))


def find_tokenizer(path: str | Path) -> Path | None:
    """tokenizer.model in the checkpoint folder, or in its parent (Meta's download puts it beside the
    llama-2-7b/ folders). A repo id is looked up in the hub cache first (`resolve_checkpoint`)."""
    path = Path(path)
    if not path.exists() and _REPO_ID_RE.match(str(path)):
        path = resolve_checkpoint(path)
    return next((p for p in (path / "tokenizer.model", path.parent / "tokenizer.model") if p.is_file()), None)


def load_model(path: str | Path, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
               hook: Hook | None = None, progress: Callable[[int, int], None] | None = None) -> Transformer:
    """Load a Meta or Hugging Face Llama checkpoint folder (or a repo id in the local hub cache, see
    `resolve_checkpoint`), streaming one tensor at a time.

    hook(name, tensor), if given, is called once per tensor (Meta names, after merging shards, casting to
    dtype and moving to device). It returns the tensor to use as the parameter, or an nn.Module that
    replaces the nn.Linear owning "<module>.weight" (how quant/ quantizes while loading).
    progress(done, total), if given, is called after each tensor (7B with NF4 takes minutes on a CPU).
    Returns the model in eval mode."""
    path = resolve_checkpoint(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a folder")
    if (path / "params.json").is_file():
        args, names, stream = _open_meta(path)
    elif (path / "config.json").is_file():
        args, names, stream = _open_hf(path)
    else:
        raise CheckpointError(f"{path}: neither params.json (Meta layout) nor config.json (Hugging Face layout) found")
    _check_tokenizer(path, args.vocab_size)

    with torch.device("meta"):
        model = Transformer(args)
    expected = {n: p.shape for n, p in model.named_parameters()}
    if set(names) != set(expected):
        missing, extra = sorted(set(expected) - set(names)), sorted(set(names) - set(expected))
        raise CheckpointError(f"{path}: tensors do not match a Llama model with these params "
                              f"(missing {missing[:5]}, unexpected {extra[:5]})")
    for i, (name, t) in enumerate(stream(expected, dtype, torch.device(device)), 1):  # model order, a layer at a time
        _assign(model, name, hook(name, t) if hook is not None else t)
        if progress is not None:
            progress(i, len(expected))
    model.init_rope(torch.device(device))
    return model.eval()


def _assign(model: nn.Module, name: str, value: Tensor | nn.Module) -> None:
    module_name, _, pname = name.rpartition(".")
    if isinstance(value, nn.Module):
        if pname != "weight" or not isinstance(model.get_submodule(module_name), nn.Linear):
            raise TypeError(f"load hook returned a module for {name}; only a Linear's .weight can be replaced")
        parent_name, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, value)
    else:
        setattr(model.get_submodule(module_name), pname, nn.Parameter(value, requires_grad=value.is_floating_point()))


def _by_layer(names: list[str]) -> Iterable[list[str]]:
    """Group names so that files are reopened per layer: only one layer's pages of a memory-mapped file are
    ever resident on top of the loaded tensors."""
    for _, group in groupby(names, key=lambda n: ".".join(n.split(".")[:2]) if n.startswith("layers.") else n):
        yield list(group)


def _check_shape(file: Path, name: str, found: torch.Size, expected: torch.Size) -> None:
    if found != expected:
        raise CheckpointError(f"{file}: tensor {name} has shape {tuple(found)}, but the config implies "
                              f"{tuple(expected)}")


def _read_json(file: Path, required: Iterable[str] = ()) -> dict:
    try:
        cfg = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: cannot be read as JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    if missing := [k for k in required if k not in cfg]:
        raise CheckpointError(f"{file}: missing required key(s) {missing}")
    return cfg


# ---- Meta layout


def _torch_load(file: Path) -> dict[str, Tensor]:
    try:
        return torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"{file}: cannot be read as a PyTorch checkpoint; truncated or corrupt? ({e})") from e


def _open_meta(path: Path):
    params = _read_json(path / "params.json", required=("dim", "n_layers", "n_heads"))
    files = sorted(path.glob("consolidated.*.pth"))
    if not files:
        raise CheckpointError(f"{path}: params.json but no consolidated.NN.pth weight files")
    if files != [path / f"consolidated.{i:02d}.pth" for i in range(len(files))]:
        raise CheckpointError(f"{path}: shard files {[f.name for f in files]} are not consolidated.00 .. "
                              f"{len(files) - 1:02d} (a model-parallel shard is missing or misnamed)")
    first = _torch_load(files[0])
    keys = set(first) - set(_IGNORED_META)
    for f in files[1:]:
        other = set(_torch_load(f)) - set(_IGNORED_META)
        if other != keys:
            raise CheckpointError(f"{f}: holds different tensors than {files[0].name} "
                                  f"(e.g. {sorted(other ^ keys)[:3]}): the shards are not from one checkpoint")

    # other keys (e.g. Llama 3's) are ignored
    args = ModelArgs(**{k: v for k, v in params.items() if k in ModelArgs.__dataclass_fields__})
    if args.vocab_size <= 0:
        if "tok_embeddings.weight" not in first:
            raise CheckpointError(f"{files[0]}: no tok_embeddings.weight, so vocab_size -1 cannot be resolved")
        args.vocab_size = first["tok_embeddings.weight"].shape[0]  # rows are not split, only columns
    del first

    def stream(expected: dict[str, torch.Size], dtype: torch.dtype, device: torch.device):
        for group in _by_layer(list(expected)):
            shards = [_torch_load(f) for f in files]
            for name in group:
                parts = [s[name] for s in shards]
                kind = name.split(".")[-2]
                if kind in _COLUMN_PARALLEL:
                    dim = 0
                elif kind in _ROW_PARALLEL:
                    dim = 1
                else:  # replicated: shard 0 holds all of it
                    parts, dim = parts[:1], 0
                if len({p.shape for p in parts}) != 1:
                    raise CheckpointError(f"{path}: tensor {name} has different shapes across shards "
                                          f"{[tuple(p.shape) for p in parts]}")
                shape = torch.Size(n * len(parts) if d == dim else n for d, n in enumerate(parts[0].shape))
                _check_shape(path, name, shape, expected[name])
                # Copy the shards straight into the merged tensor in the target dtype and device: no
                # full-size temporary, and the result never aliases the memory-mapped file.
                out = torch.empty(shape, dtype=dtype, device=device)
                for out_part, part in zip(out.chunk(len(parts), dim), parts):
                    out_part.copy_(part)
                del parts
                yield name, out
            del shards  # unmaps the files: only this layer's pages were ever resident

    return args, sorted(keys), stream


# ---- Hugging Face layout


def _safe_open(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: cannot be read as safetensors; truncated or corrupt? ({e})") from e


def _hf_args(file: Path) -> ModelArgs:
    cfg = _read_json(file, required=("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                     "vocab_size"))
    if cfg.get("model_type", "llama") != "llama":
        raise CheckpointError(f"{file}: model_type {cfg['model_type']!r}, expected 'llama'")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}  # transformers 5 / 4
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise CheckpointError(f"{file}: RoPE scaling {rope} is not supported (Llama 2 uses plain RoPE)")
    dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    if cfg.get("head_dim", dim // n_heads) != dim // n_heads:
        raise CheckpointError(f"{file}: head_dim {cfg['head_dim']} != hidden_size / num_attention_heads")
    # Meta's FFN rule (2/3 * 4 * dim, x ffn_dim_multiplier, rounded up to multiple_of) must give
    # intermediate_size: Llama 2 7B/13B are multiple_of 256; otherwise choose values that hit it exactly.
    hidden, base = cfg["intermediate_size"], int(2 * 4 * dim / 3)
    multiple_of, mult = (256, None) if 256 * -(-base // 256) == hidden else (hidden, hidden / base)
    return ModelArgs(dim=dim, n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
                     n_kv_heads=cfg.get("num_key_value_heads"), vocab_size=cfg["vocab_size"],
                     multiple_of=multiple_of, ffn_dim_multiplier=mult, norm_eps=cfg.get("rms_norm_eps", 1e-5),
                     rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
                     max_seq_len=cfg.get("max_position_embeddings", 4096))


def _open_hf(path: Path):
    cfg_file = path / "config.json"
    args = _hf_args(cfg_file)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no weight_map")
        for fname in set(weight_map.values()):
            if not (path / fname).is_file():
                raise CheckpointError(f"{index} names {fname}, which is not in {path}")
    else:
        single = path / "model.safetensors"
        files = [single] if single.is_file() else sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path}: config.json but no *.safetensors weights")
        weight_map = {}
        for f in files:
            with _safe_open(f) as sf:
                weight_map.update({k: f.name for k in sf.keys()})

    where = {}  # Meta name -> (file, HF key)
    for key, fname in weight_map.items():
        if key.endswith("rotary_emb.inv_freq"):  # a buffer some older exports saved; recomputed
            continue
        try:
            where[hf_to_meta_key(key)] = (path / fname, key)
        except ValueError as e:
            raise CheckpointError(f"{path / fname}: unexpected tensor {key!r}") from e
    if "output.weight" not in where:
        if "tok_embeddings.weight" in where and _read_json(cfg_file).get("tie_word_embeddings", False):
            where["output.weight"] = where["tok_embeddings.weight"]  # tied: output starts as a copy of the embedding
        else:
            raise CheckpointError(f"{path}: no lm_head.weight and tie_word_embeddings is not set in config.json")

    def stream(expected: dict[str, torch.Size], dtype: torch.dtype, device: torch.device):
        for group in _by_layer(list(expected)):
            handles = {file: _safe_open(file) for file in {where[name][0] for name in group}}
            for name in group:
                file, key = where[name]
                t = handles[file].get_tensor(key)  # may be a view of the memory-mapped file
                _check_shape(file, name, t.shape, expected[name])
                out = torch.empty(t.shape, dtype=dtype, device=device)  # our own memory, in the target dtype
                if heads := rotary_heads(args, name):
                    unpermute_from_hf(t, heads, out=out)
                else:
                    out.copy_(t)
                del t
                yield name, out
            del handles

    return args, sorted(where), stream


def _check_tokenizer(path: Path, vocab_size: int) -> None:
    """The embedding must have a row for every token id; it may be larger only by padding to a multiple of 128."""
    tok = find_tokenizer(path)
    if tok is None:
        return
    try:
        t = Tokenizer(tok)  # it decides its size: the SentencePiece vocabulary and the added tokens beside it
    except ValueError as e:  # a malformed added_tokens.json; the message names the file
        raise CheckpointError(str(e)) from e
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"{tok}: cannot be read as a SentencePiece model ({e})") from e
    if not (vocab_size == t.n_words or (t.n_words < vocab_size < t.n_words + 128 and vocab_size % 128 == 0)):
        raise CheckpointError(f"{tok} has {t.n_words} tokens ({len(t.special_tokens)} from added_tokens.json), but the "
                              f"checkpoint in {path} has {vocab_size} embedding rows")
