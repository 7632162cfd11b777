"""Saving: a model as a Meta or Hugging Face checkpoint folder, and the tokenizer files that go beside it.

Meta layout: `consolidated.00.pth` (the whole model as one model-parallel shard) + `params.json`.
Hugging Face layout: `config.json` + `model.safetensors` (split into `model-0000k-of-0000n.safetensors` + an index
past a size), with HF's names and wq/wk's rows in HF's rotary order (`llama.checkpoint`'s `meta_to_hf_key` and
`permute_for_hf`, which the loader and LoRA's PEFT export use too). Either way the folder is written to a
temporary folder and renamed into place (`llama.files.atomic_folder`).

Tokenizer files (`save_tokenizer_files`): our `tokenizer.model` + `added_tokens.json`, and what Hugging Face
tooling and llama.cpp's converter read: `tokenizer_config.json` (with the chat template in Jinja, the twin of
the Python renderer in `llama.chat`), `special_tokens_map.json`, `generation_config.json` for a model, and
`tokenizer.json`.

`hf_tokenizer_json` writes the tokenizer in the `tokenizers` library's format (`tokenizer.json`), so that
Hugging Face tooling loads an exported folder without converting `tokenizer.model` itself (transformers 5
needs protobuf for that). SentencePiece BPE and `tokenizers` BPE agree when the merges are ranked by the score
of the piece they make, which is how SentencePiece picks the next merge; the normalizer (dummy-prefix space,
spaces as "▁", and extra spaces removed when the model does that) is restated as `tokenizers` normalizers,
which run on each piece of text between special tokens, as `Tokenizer.encode` does. The settings it checks
are read from the SentencePiece model's protobuf bytes with a few lines of wire-format parsing (no protobuf
dependency).
"""
import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from .chat import CHAT_TEMPLATES, check_template, stop_ids
from .checkpoint import meta_to_hf_key, permute_for_hf, rotary_heads
from .files import atomic_folder
from .model import ModelArgs, Transformer
from .tokenizer import Tokenizer

SPACE = "\u2581"  # "▁": SentencePiece's stand-in for a space


# ---------------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------------


def save_model(model: Transformer, path: str | Path, layout: str = "meta",
               tokenizer: str | Path | Tokenizer | None = None, max_shard_size: int = 5 * 10**9,
               template: str | None = None) -> Path:
    """Write `model` as a Meta folder (consolidated.00.pth + params.json) or a Hugging Face folder
    (config.json + model.safetensors, split into model-0000k-of-0000n.safetensors + an index past
    max_shard_size bytes), in the dtype of its embedding. `tokenizer` (a tokenizer.model or its folder, or a
    `Tokenizer`) goes in too, with its added tokens; with the chat `template` it was trained on, also the
    files Hugging Face tooling and llama.cpp's converter read (`save_tokenizer_files`: tokenizer.json,
    tokenizer_config.json with the Jinja chat_template, special_tokens_map.json, generation_config.json).
    Written to a temporary folder and renamed into place, so a crash never leaves a half-written `path` (an
    existing `path` is replaced)."""
    if layout not in ("meta", "hf"):
        raise ValueError(f"save_model: layout must be 'meta' or 'hf', got {layout!r}")
    if template is not None and tokenizer is None:
        raise ValueError("save_model: a chat template is written with a tokenizer; pass tokenizer= too")
    path = Path(path)
    if isinstance(tokenizer, (str, Path)):
        tokenizer = Tokenizer(tokenizer)  # a missing file is an error that names it, before anything is written

    tensors = _export_tensors(model)
    dtype = model.tok_embeddings.weight.dtype
    with atomic_folder(path) as tmp:
        if layout == "meta":
            torch.save({n: _materialize(n, get, shape, dtype) for n, (get, shape) in tensors.items()},
                       tmp / "consolidated.00.pth")
            (tmp / "params.json").write_text(json.dumps(meta_params(model.args), indent=2))
        else:
            hidden = tensors["layers.0.feed_forward.w1.weight"][1][0]
            (tmp / "config.json").write_text(json.dumps(hf_config(model.args, hidden, dtype), indent=2))
            _save_hf_weights(tensors, model.args, dtype, tmp, max_shard_size)
        if template is not None:
            save_tokenizer_files(tokenizer, tmp, template, model=True, max_length=model.args.max_seq_len)
        elif tokenizer is not None:
            tokenizer.save(tmp)
    return path


def _export_tensors(model: Transformer) -> dict[str, tuple[Callable[[], Tensor], torch.Size]]:
    """Meta name -> (a function giving that dense weight, its shape), in Meta's order. A module with a
    `dequantize()` method and no `.weight` (quant.NF4Linear) gives its dequantized weight as
    "<module>.weight"; the functions are called one at a time while writing, so a quantized model is never
    dense all at once. Anything that is not a parameter of the Llama architecture (e.g. an unmerged LoRA)
    is an error."""
    quantized = {name: m.dequantize for name, m in model.named_modules()
                 if callable(getattr(m, "dequantize", None)) and not isinstance(getattr(m, "weight", None), Tensor)}
    found = {f"{q}.weight": dequantize for q, dequantize in quantized.items()}
    # every other parameter (a tied one under each of its names)
    found.update({n: p.detach for n, p in model.named_parameters(remove_duplicate=False)
                  if not any(n.startswith(q + ".") for q in quantized)})
    with torch.device("meta"):
        expected = {n: p.shape for n, p in Transformer(model.args).named_parameters()}
    if set(found) != set(expected):
        missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        raise ValueError(f"save_model: the model is not a plain Llama (missing {missing[:3]}, extra {extra[:3]}); "
                         "merge LoRA adapters first (lora.merge_lora)")
    return {n: (found[n], shape) for n, shape in expected.items()}


def _materialize(name: str, get: Callable[[], Tensor], shape: torch.Size, dtype: torch.dtype) -> Tensor:
    t = get().detach()
    if t.shape != shape:
        raise ValueError(f"save_model: {name} has shape {tuple(t.shape)}, model.args imply {tuple(shape)}")
    return t.to("cpu", dtype).contiguous()


def meta_params(args: ModelArgs) -> dict:
    """params.json as Meta writes it. Meta's Llama 2 loader passes these to its ModelArgs(max_seq_len=...,
    **params), so max_seq_len must not appear and rope_theta only where it is not the default."""
    params = dict(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, multiple_of=args.multiple_of,
                  norm_eps=args.norm_eps, vocab_size=args.vocab_size)
    # the rest only where not the default (Meta's 7B and 13B params.json have no n_kv_heads)
    defaults = {"n_kv_heads": args.n_heads, "ffn_dim_multiplier": None, "rope_theta": 10000.0}
    return params | {k: getattr(args, k) for k, default in defaults.items() if getattr(args, k) != default}


def hf_config(args: ModelArgs, intermediate_size: int, dtype: torch.dtype) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": args.dim, "intermediate_size": intermediate_size,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads,
        "num_hidden_layers": args.n_layers, "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
        "rope_scaling": None, "vocab_size": args.vocab_size, "max_position_embeddings": args.max_seq_len,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None, "initializer_range": 0.02,
        "torch_dtype": str(dtype).removeprefix("torch."), "use_cache": True,
    }


def _save_hf_weights(tensors: dict, args: ModelArgs, dtype: torch.dtype, folder: Path, max_shard_size: int) -> None:
    """Plan the shards from the shapes first (file names carry the shard count), then write one shard at a
    time so only one shard is ever materialised on the CPU."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    plan: list[list[str]] = [[]]
    size = total = 0
    for name, (_, shape) in tensors.items():
        nbytes = shape.numel() * itemsize
        if plan[-1] and size + nbytes > max_shard_size:
            plan.append([])
            size = 0
        plan[-1].append(name)
        size += nbytes
        total += nbytes
    files = (["model.safetensors"] if len(plan) == 1 else
             [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))])
    weight_map = {}
    for fname, names in zip(files, plan):
        shard = {}
        for name in names:
            t = _materialize(name, *tensors[name], dtype)
            if heads := rotary_heads(args, name):
                t = permute_for_hf(t, heads)
            shard[meta_to_hf_key(name)] = t.contiguous()
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    if len(plan) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


# ---------------------------------------------------------------------------------------------------
# Tokenizer files
# ---------------------------------------------------------------------------------------------------


def save_tokenizer_files(tokenizer: Tokenizer, folder: str | Path, template: str, model: bool,
                         max_length: int = 4096) -> None:
    """Write `tokenizer` into `folder` with what loads it elsewhere, the chat `template` it was trained with
    included.

    tokenizer.model (+ added_tokens.json when there are added tokens): ours, and llama.cpp's converter reads
    them. tokenizer.json: the same tokenizer for Hugging Face `tokenizers` (when `hf_tokenizer_json` can
    restate it exactly). tokenizer_config.json: BOS added to plain text, no EOS, the special and added tokens,
    `chat_template` (this template in Jinja) and `model_max_length`. special_tokens_map.json. With `model`
    (a folder holding weights), generation_config.json: bos id and every stop id of the template as eos."""
    check_template(template)
    folder = Path(folder)
    tokenizer.save(folder)
    sp = tokenizer.sp
    bos, eos, unk = (sp.id_to_piece(i) for i in (tokenizer.bos_id, tokenizer.eos_id, sp.unk_id()))
    decoder = {i: sp.id_to_piece(i) for i in range(sp.vocab_size()) if sp.is_control(i) or sp.is_unknown(i)}
    decoder.update({i: t for t, i in tokenizer.special_tokens.items()})
    added = sorted(tokenizer.special_tokens, key=tokenizer.special_tokens.get)
    hf_json = hf_tokenizer_json(tokenizer)
    if hf_json is None:  # a stale tokenizer.json would not match this tokenizer
        (folder / "tokenizer.json").unlink(missing_ok=True)
    files = {"tokenizer.json": hf_json} if hf_json is not None else {}
    files["tokenizer_config.json"] = {
        # with tokenizer.json, transformers uses it as written (PreTrainedTokenizerFast); without it,
        # transformers' LlamaTokenizer converts tokenizer.model, and "legacy" keeps the dummy-prefix space
        # on every piece of text between special tokens, as `Tokenizer.encode` does
        "tokenizer_class": "PreTrainedTokenizerFast" if hf_json is not None else "LlamaTokenizer",
        "legacy": True, "add_bos_token": True, "add_eos_token": False,
        "bos_token": bos, "eos_token": eos, "unk_token": unk, "pad_token": None,
        "added_tokens_decoder": {str(i): {**_token_entry(t), "special": True} for i, t in sorted(decoder.items())},
        "additional_special_tokens": added,
        "chat_template": CHAT_TEMPLATES[template],
        "model_max_length": max_length, "clean_up_tokenization_spaces": False,
    }
    special_map = {"bos_token": _token_entry(bos), "eos_token": _token_entry(eos), "unk_token": _token_entry(unk)}
    files["special_tokens_map.json"] = {**special_map, **({"additional_special_tokens": added} if added else {})}
    if model:
        files["generation_config.json"] = {"bos_token_id": tokenizer.bos_id,
                                           "eos_token_id": stop_ids(tokenizer, template)}
    for name, content in files.items():
        (folder / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")


def _token_entry(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def hf_tokenizer_json(tok: Tokenizer) -> dict | None:
    """`tok` as a `tokenizers` tokenizer.json (BOS added to plain text, as Llama 2's Hugging Face export does),
    or None when its SentencePiece model is not the kind this restates exactly: BPE with byte fallback, the
    "identity" normalizer, a dummy prefix and no user-defined pieces (Llama 2's is one)."""
    sp = tok.sp
    model = _proto_fields(sp.serialized_model_proto())
    # ModelProto: 1 pieces (each: 3 type: 1 normal (the default), 2 unknown, 3 control, 4 user-defined, 5 unused,
    # 6 byte), 2 TrainerSpec (3 model_type, 2 = BPE; 35 byte_fallback), 3 NormalizerSpec (1 name,
    # 3 add_dummy_prefix, 4 remove_extra_whitespaces, 5 escape_whitespaces; all three default on)
    trainer = dict(_proto_fields(next((v for f, v in model if f == 2), b"")))
    norm = dict(_proto_fields(next((v for f, v in model if f == 3), b"")))
    types = [dict(_proto_fields(v)).get(3, 1) for f, v in model if f == 1]
    if (trainer.get(3) != 2 or trainer.get(35) != 1 or norm.get(1, b"") != b"identity" or norm.get(3, 1) != 1
            or norm.get(5, 1) != 1 or 4 in types):
        return None
    pieces = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    mergeable = {p: i for i, (t, p) in enumerate(zip(types, pieces)) if t == 1}
    ranked = []
    for piece, i in mergeable.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in mergeable and right in mergeable:
                ranked.append((-sp.get_score(i), i, mergeable[left], mergeable[right], left, right))
    ranked.sort()
    normalizers = [{"type": "Prepend", "prepend": SPACE},
                   {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}]
    if norm.get(4, 1):  # remove_extra_whitespaces: no leading or trailing spaces, runs of spaces collapse to one
        normalizers = [{"type": "Replace", "pattern": {"Regex": "\\A +| +\\z"}, "content": ""},
                       {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}] + normalizers
    special = {i: p for i, (t, p) in enumerate(zip(types, pieces)) if t in (2, 3)}  # unknown and control
    special.update({i: t for t, i in tok.special_tokens.items()})
    bos = pieces[tok.bos_id]
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, t in sorted(special.items())],
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [tok.bos_id], "tokens": [bos]}},
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": SPACE}, "content": " "}, {"type": "ByteFallback"},
            {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": pieces[sp.unk_id()], "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": {p: i for i, p in enumerate(pieces)}, "merges": [[r[4], r[5]] for r in ranked]},
    }


def _proto_fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """The top-level fields of a protobuf message, in order, as (field number, value).

    Enough of the wire format to read a SentencePiece model's settings and piece types with no protobuf
    dependency."""
    out = []
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        wire = key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            value, i = buf[i:i + n], i + n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        out.append((key >> 3, value))
    return out


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i
