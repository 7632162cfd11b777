"""Llama 2 checkpoints in and out: Meta's layout and Hugging Face's.

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
which is `permute_for_hf`; `unpermute_from_hf` is its inverse. Scores q·k are sums over the pairs, so
renumbering the pairs the same way in q and k changes nothing else.

Loading streams: the model is built on the `meta` device (no memory), files are opened with
`torch.load(mmap=True)` / safetensors' lazy `safe_open`, and each tensor in turn is merged across shards,
cast, moved to the device, passed to an optional `hook` and assigned. Peak memory stays near one copy
of the model in the target dtype.
"""
import re

from torch import Tensor

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


def permute_for_hf(w: Tensor, n_heads: int) -> Tensor:
    """Meta -> HF row order of wq (n_heads) or wk (pass n_kv_heads): within each head, Meta row 2i + j goes
    to HF row j * D/2 + i. w: [n_heads * D, ...] (a weight, a LoRA B matrix, a bias)."""
    D = w.shape[0] // n_heads
    assert n_heads * D == w.shape[0] and D % 2 == 0, f"{tuple(w.shape)} rows do not split into {n_heads} heads"
    return w.reshape(n_heads, D // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_from_hf(w: Tensor, n_heads: int) -> Tensor:
    """HF -> Meta row order, the inverse of `permute_for_hf`."""
    D = w.shape[0] // n_heads
    assert n_heads * D == w.shape[0] and D % 2 == 0, f"{tuple(w.shape)} rows do not split into {n_heads} heads"
    return w.reshape(n_heads, 2, D // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
