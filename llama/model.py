"""Llama 2, the model: RMSNorm, RoPE, grouped-query attention, SwiGLU, read top to bottom.

The math follows Meta's reference (meta-llama/llama `llama/model.py`) and its parameter names, so a
Meta state dict loads with no renaming:

    h   = tok_embeddings[tokens]
    h   = h + wo · Attention(RoPE(wq · RMSNorm(h)), RoPE(wk · RMSNorm(h)), wv · RMSNorm(h))  (per layer,
    h   = h + w2 · (silu(w1 · RMSNorm(h)) * (w3 · RMSNorm(h)))                              attention_norm, ffn_norm)
    out = output · RMSNorm(h)

- RMSNorm(x) = x / sqrt(mean(x²) + eps) * weight, computed in fp32 and cast back (Zhang & Sennrich 2019).
- RoPE (Su et al. 2021) in Meta's convention: each head vector is read as interleaved pairs
  (x0, x1), (x2, x3), ...; pair i at position p is rotated by the angle p * theta^(-2i/D):
      (a, b) -> (a cos - b sin, a sin + b cos).
  (Hugging Face rotates the halves (x_i, x_{i+D/2}) instead; `checkpoint.permute_for_hf` maps one to the
  other by permuting the rows of wq and wk.) cos/sin live in real fp32 buffers, not complex ones: complex
  buffers break NCCL broadcast and bf16 casts.
- GQA (Ainslie et al. 2023): n_kv_heads <= n_heads; each K/V head serves n_heads // n_kv_heads query heads.
- SwiGLU (Shazeer 2020) with Meta's hidden size: 2/3 * 4 * dim, times ffn_dim_multiplier, rounded up to
  multiple_of (7B: 11008, 13B: 13824, 70B: 28672).
- RMSNorm and the SwiGLU product run as small autograd Functions with their backward passes written out
  (`llama/ops.py`, as is the output head's chunked cross-entropy): the same forward arithmetic, less kept for
  backward.

Three ways to run attention, one `forward`, each with its own argument to Attention:
- plain: causal self-attention over each row (SDPA, `is_causal=True`: flash kernels on CUDA).
- packed (`doc_ids`): several documents share a row; a token attends only to earlier tokens of its own
  document and RoPE positions restart at 0 where a document starts, so each document sees exactly what it
  would see alone. The mask is causal AND same-doc (block-diagonal). On CUDA it is a flex_attention
  BlockMask (`block_mask`; compiled flex_attention skips the blocks that are fully masked, so short documents
  cost what they would cost alone, and it never materialises a T x T mask); elsewhere, or without
  flex_attention, each document is its own causal SDPA call (`spans`, the row split at document boundaries,
  `attend_spans`): the same saving, sum of L_i^2 instead of T^2, at the price of one kernel call per
  document, cheap on CPU.
- cached (`start_pos`): generation with a KV cache (`setup_cache`), Meta's scheme: one start position for
  the batch, prompts right-padded, prefill (T > 1) then one token at a time (T == 1); a prefill after a
  cached prefix is causal with an offset (`cache_mask`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .ops import causal_sdpa, head_ce, rms_norm, swiglu

try:  # torch >= 2.5
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover - older torch: SDPA with a boolean mask everywhere
    BlockMask = create_block_mask = flex_attention = None

# Use flex_attention for packed rows: None = on CUDA only (compiled there; on CPU the eager flex path is
# an unfused reference implementation, slower than SDPA). Tests set it to True to check the flex mask on CPU.
USE_FLEX: bool | None = None
_flex_compiled = None

Spans = list[list[tuple[int, int]]]  # per row of a packed batch, its documents' [start, end) token ranges


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None (absent in 7B/13B params.json): = n_heads, set on construction; 70B: 8
    vocab_size: int = -1  # -1 in Meta's params.json: take it from the weights
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device=None) -> tuple[Tensor, Tensor]:
    """cos, sin of shape [max_seq_len, head_dim // 2] in fp32: angle[p, i] = p * theta^(-2i / head_dim)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs of x [B, T, H, D] by angles whose cos/sin are [B or 1, T, D/2]."""
    xf = x.float().unflatten(-1, (-1, 2))  # (B, T, H, D/2, 2)
    a, b = xf[..., 0], xf[..., 1]
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # (B, T, 1, D/2): same angle for every head
    out = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1)
    return out.flatten(-2).type_as(x)


def doc_positions(doc_ids: Tensor) -> Tensor:
    """Position of each token inside its document: [B, T] ids -> [B, T] positions restarting at 0 wherever
    the id changes (documents are contiguous runs of one id)."""
    B, T = doc_ids.shape
    idx = torch.arange(T, device=doc_ids.device).expand(B, T)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_of_run = torch.where(starts, idx, 0).cummax(dim=1).values  # index where the current run began
    return idx - start_of_run


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        assert args.n_heads % self.n_kv_heads == 0, "n_heads must be a multiple of n_kv_heads"
        self.head_dim = args.dim // args.n_heads
        self.wq = nn.Linear(args.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=False)
        self.cache_k: Tensor | None = None  # (B_max, H_kv, S_max, D), set by Transformer.setup_cache
        self.cache_v: Tensor | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, *, spans: Spans | None = None,
                block_mask: BlockMask | None = None, start_pos: int | None = None,
                cache_mask: Tensor | None = None) -> Tensor:
        """Causal self-attention over x [B, T, dim], rotated by cos, sin [B or 1, T, D/2]. The keywords pick
        the path (none of them: plain causal rows):
        - spans: packed rows, each document one causal SDPA call (`document_spans`).
        - block_mask: packed rows, one flex_attention call (`document_block_mask`).
        - start_pos: generation; K/V of positions start_pos..start_pos+T-1 go into the cache and the queries
          attend to all cached positions, through cache_mask [1, 1, T, start_pos + T] (True = attend) when a
          prefill follows a cached prefix."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)

        if start_pos is not None:  # write this step's K/V into the cache, attend to everything so far
            if self.cache_k is None:
                raise RuntimeError("start_pos given but no KV cache: call model.setup_cache(batch, seq_len) first")
            end = start_pos + T
            if B > self.cache_k.shape[0] or end > self.cache_k.shape[2]:
                raise ValueError(f"KV cache holds batch {self.cache_k.shape[0]} x {self.cache_k.shape[2]} positions; "
                                 f"got batch {B}, positions {start_pos}..{end - 1}")
            self.cache_k[:B, :, start_pos:end] = k
            self.cache_v[:B, :, start_pos:end] = v
            k, v = self.cache_k[:B, :, :end], self.cache_v[:B, :, :end]  # (B, H_kv, S, D)

        rep = self.n_heads // self.n_kv_heads  # query heads per K/V head (GQA)
        if spans is not None:  # packed rows as document spans: one SDPA call per document
            out = attend_spans(q, repeat_kv(k, rep), repeat_kv(v, rep), spans)
        elif block_mask is not None:  # packed rows as a flex_attention BlockMask (CUDA); flex does GQA itself
            out = _flex(q, k, v, block_mask)
        else:  # causal, or causal from a cached prefix (cache_mask)
            k, v = repeat_kv(k, rep), repeat_kv(v, rep)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=cache_mask, is_causal=cache_mask is None and T > 1)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))  # (B, T, dim)


def repeat_kv(x: Tensor, rep: int) -> Tensor:
    """[B, H_kv, S, D] -> [B, H_kv * rep, S, D], each K/V head repeated for the query heads it serves (Meta's
    repeat_kv; SDPA's enable_gqa is not taken by every kernel)."""
    return x.repeat_interleave(rep, dim=1) if rep > 1 else x


def attend_spans(q: Tensor, k: Tensor, v: Tensor, spans: Spans) -> Tensor:
    """Causal attention inside each document of packed rows, one SDPA call per document: q, k, v [B, H, T, D],
    spans[b] the [(start, end), ...] of row b's documents, covering it (`document_spans`).

    Rows and documents are cut with `split`, whose backward is one cat per tensor, not by slicing, whose
    backward fills a zero tensor of q's full size per slice and adds it in. Rows stay 4-d [1, H, T, D]
    (split, not unbind): CPU's flash kernel takes 4-d inputs, 3-d goes to the math kernel."""
    rows = []
    for row, row_spans in zip(zip(q.split(1), k.split(1), v.split(1)), spans):
        docs = zip(*(t.split([e - s for s, e in row_spans], dim=2) for t in row))
        # causal_sdpa = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True), shaped for the CPU (ops.py)
        rows.append(torch.cat([causal_sdpa(qd, kd, vd) for qd, kd, vd in docs], dim=2))
    return torch.cat(rows)  # (B, H, T, D)


def _flex(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask) -> Tensor:
    global _flex_compiled
    if q.device.type != "cuda":  # eager reference path (tests on CPU)
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)
    if _flex_compiled is None:  # flex_attention is only fast compiled; compile once per process
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    return _flex_compiled(q, k, v, block_mask=block_mask, enable_gqa=True)


class FeedForward(nn.Module):
    def __init__(self, dim: int, multiple_of: int, ffn_dim_multiplier: float | None):
        super().__init__()
        hidden = int(2 * (4 * dim) / 3)
        if ffn_dim_multiplier is not None:
            hidden = int(ffn_dim_multiplier * hidden)
        hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(swiglu(self.w1(x), self.w3(x)))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.multiple_of, args.ffn_dim_multiplier)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.resid_dropout = 0.0  # LIMA-style residual dropout; train.py sets it per layer

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, *, spans: Spans | None = None,
                block_mask: BlockMask | None = None, start_pos: int | None = None,
                cache_mask: Tensor | None = None) -> Tensor:
        p = self.resid_dropout if self.training else 0.0
        a = self.attention(self.attention_norm(x), cos, sin, spans=spans, block_mask=block_mask, start_pos=start_pos,
                           cache_mask=cache_mask)
        h = x + (F.dropout(a, p) if p > 0 else a)
        f = self.feed_forward(self.ffn_norm(h))
        return h + (F.dropout(f, p) if p > 0 else f)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        if args.vocab_size <= 0:
            raise ValueError(f"ModelArgs.vocab_size must be set (got {args.vocab_size})")
        if args.dim % args.n_heads:
            raise ValueError(f"dim {args.dim} is not a multiple of n_heads {args.n_heads}")
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.grad_checkpointing = False
        cos, sin = rope_tables(args.dim // args.n_heads, args.max_seq_len, args.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_seq_len, head_dim/2), fp32
        self.register_buffer("rope_sin", sin, persistent=False)

    def init_rope(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the RoPE tables in fp32 on `device` (default: where the embedding lives). Needed after
        building on the meta device, where buffers hold no data."""
        device = device if device is not None else self.tok_embeddings.weight.device
        a = self.args
        self.rope_cos, self.rope_sin = rope_tables(a.dim // a.n_heads, a.max_seq_len, a.rope_theta, device)

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) would cast the RoPE tables too (angles up to 4096 need fp32) and to_empty() would
        # leave them uninitialised: recompute them, in fp32, wherever they now live. They are small.
        super()._apply(fn, recurse)
        if self.rope_cos.device.type != "meta":
            self.init_rope(self.rope_cos.device)
        return self

    def setup_cache(self, max_batch_size: int, max_seq_len: int) -> None:
        """Allocate each layer's K/V cache, (max_batch_size, n_kv_heads, max_seq_len, head_dim), in the
        model's dtype and device."""
        if max_seq_len > self.args.max_seq_len:
            raise ValueError(f"cache length {max_seq_len} exceeds the model's max_seq_len {self.args.max_seq_len}")
        w = self.tok_embeddings.weight
        for layer in self.layers:
            attn = layer.attention
            shape = (max_batch_size, attn.n_kv_heads, max_seq_len, attn.head_dim)
            attn.cache_k = torch.zeros(shape, dtype=w.dtype, device=w.device)
            attn.cache_v = torch.zeros(shape, dtype=w.dtype, device=w.device)

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.attention.cache_k = layer.attention.cache_v = None

    def forward(self, tokens: Tensor, doc_ids: Tensor | None = None, *, labels: Tensor | None = None,
                start_pos: int | None = None, return_hidden: bool = False) -> Tensor:
        """tokens [B, T] -> logits [B, T, vocab]. doc_ids [B, T]: packed documents (see the module docstring).
        labels [B, T] (next-token targets: labels[b, t] is the token after tokens[b, t], -100 = not trained):
        return the summed cross-entropy over trained tokens instead, the head computed only where labels
        are trained (`head_ce`). start_pos: KV-cache mode, tokens sit at positions start_pos..start_pos+T-1.
        return_hidden: the final-normed hidden states [B, T, dim] (generation applies the head to the last
        position only)."""
        B, T = tokens.shape
        if doc_ids is not None and start_pos is not None:
            raise ValueError("doc_ids (packed training) and start_pos (KV-cache generation) cannot be combined")
        end = T if start_pos is None else start_pos + T
        if end > self.args.max_seq_len:
            raise ValueError(f"sequence reaches position {end}, beyond max_seq_len {self.args.max_seq_len}")
        h = self.tok_embeddings(tokens)  # (B, T, dim)

        spans = block_mask = cache_mask = None  # plain causal
        if doc_ids is not None:
            if doc_ids.shape != tokens.shape:
                raise ValueError(f"doc_ids shape {tuple(doc_ids.shape)} != tokens shape {tuple(tokens.shape)}")
            pos = doc_positions(doc_ids)  # (B, T)
            cos, sin = self.rope_cos[pos], self.rope_sin[pos]  # (B, T, D/2)
            if _use_flex(doc_ids.device):
                block_mask = document_block_mask(doc_ids)
            else:
                spans = document_spans(doc_ids)
        else:
            s = 0 if start_pos is None else start_pos
            cos, sin = self.rope_cos[None, s:end], self.rope_sin[None, s:end]  # (1, T, D/2)
            if start_pos and T > 1:  # prefill after a cached prefix: causal with an offset (at 0, is_causal does)
                i = torch.arange(T, device=tokens.device)[:, None] + start_pos
                cache_mask = (torch.arange(end, device=tokens.device)[None, :] <= i)[None, None]  # (1, 1, T, end)

        for layer in self.layers:
            if self.grad_checkpointing and self.training and start_pos is None:
                h = checkpoint(layer, h, cos, sin, spans=spans, block_mask=block_mask, use_reentrant=False)
            else:
                h = layer(h, cos, sin, spans=spans, block_mask=block_mask, start_pos=start_pos, cache_mask=cache_mask)
        h = self.norm(h)
        if labels is not None:
            return head_ce(h.flatten(0, 1), self.output.weight, labels.flatten())
        return h if return_hidden else self.output(h)


# Packed rows: causal AND same-document attention. Each document is one contiguous run of its id in doc_ids
# [B, T]; give every document in a row its own id (padding may share one id: it then only attends to padding).


def _use_flex(device: torch.device) -> bool:
    """Packed rows take flex_attention: by default on CUDA (USE_FLEX overrides), where torch has it."""
    use = USE_FLEX if USE_FLEX is not None else device.type == "cuda"
    return use and create_block_mask is not None


def document_spans(doc_ids: Tensor) -> Spans:
    """Each row's documents as [(start, end), ...], for `attend_spans`."""
    T = doc_ids.shape[1]
    change = (doc_ids[:, 1:] != doc_ids[:, :-1]).cpu()  # (B, T-1): True where a new document starts
    spans = []
    for row in change:
        cuts = [0] + (row.nonzero().flatten() + 1).tolist() + [T]
        spans.append(list(zip(cuts[:-1], cuts[1:])))
    return spans


def document_block_mask(doc_ids: Tensor) -> BlockMask:
    """The mask as a flex_attention BlockMask: compiled on CUDA, so the [B, T, T] mask is never
    materialised, only its 128 x 128 block summary."""
    B, T = doc_ids.shape

    def same_doc_causal(b, h, q, kv):
        return (q >= kv) & (doc_ids[b, q] == doc_ids[b, kv])
    return create_block_mask(same_doc_causal, B, None, T, T, device=doc_ids.device,
                             _compile=doc_ids.device.type == "cuda")


@torch.no_grad()
def resize_embeddings(model: Transformer, n_rows: int) -> None:
    """Grow tok_embeddings and output to n_rows rounded up to a multiple of 128 (added special tokens).

    New rows start as the mean of the existing rows: a new token begins as the "average" token, so its
    logit starts near the average and the first steps are not thrown off. Never shrinks. Keeps dtype, device
    and requires_grad; updates model.args.vocab_size."""
    old = model.tok_embeddings.weight.shape[0]
    new = 128 * math.ceil(n_rows / 128)
    if n_rows <= old:
        return
    for module in (model.tok_embeddings, model.output):
        w = module.weight
        mean = w.float().mean(0, keepdim=True).to(w.dtype)
        grown = torch.cat([w, mean.expand(new - old, -1)], dim=0)
        module.weight = nn.Parameter(grown, requires_grad=w.requires_grad)
    model.tok_embeddings.num_embeddings = new
    model.output.out_features = new
    model.args.vocab_size = new
