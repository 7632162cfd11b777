"""llama.model against independent references: transformers' LlamaForCausalLM (logits, RoPE), Meta's
complex-number RoPE formula, and the model run on each packed document alone / without a cache."""
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from conftest import hf_to_meta_state_dict
import llama.model as M
from llama.checkpoint import permute_for_hf, unpermute_from_hf
from llama.model import ModelArgs, Transformer, apply_rope, resize_embeddings, rope_tables
from llama.ops import head_ce, swiglu

DIM, LAYERS, HEADS, KV_HEADS, VOCAB, HIDDEN = 64, 2, 4, 2, 256, 192  # 192 = Meta's rule for dim 64, multiple_of 32
ARGS = dict(dim=DIM, n_layers=LAYERS, n_heads=HEADS, n_kv_heads=KV_HEADS, vocab_size=VOCAB, multiple_of=32,
            norm_eps=1e-6, rope_theta=10000.0, max_seq_len=128)


def hf_tiny(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=DIM, intermediate_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                      num_key_value_heads=KV_HEADS, vocab_size=VOCAB, rms_norm_eps=1e-6, rope_theta=10000.0,
                      max_position_embeddings=128, attn_implementation="eager")
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF initialises norms to 1: randomise them so a swapped norm cannot pass
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return model


def ours_from(hf: LlamaForCausalLM) -> Transformer:
    model = Transformer(ModelArgs(**ARGS)).eval()
    model.load_state_dict(hf_to_meta_state_dict(hf, HEADS, KV_HEADS), strict=True)
    return model


@pytest.fixture(scope="module")
def pair():
    hf = hf_tiny()
    return hf, ours_from(hf)


def test_ffn_hidden_dim_follows_meta_rule():
    # Meta's sizes: 7B 4096 -> 11008, 13B 5120 -> 13824, 70B 8192 (x1.3, multiple_of 4096) -> 28672
    for dim, mult, m in ((4096, None, 256), (5120, None, 256), (8192, 1.3, 4096)):
        with torch.device("meta"):
            ff = M.FeedForward(dim, m, mult)
        assert ff.w1.weight.shape[0] == {4096: 11008, 5120: 13824, 8192: 28672}[dim]


def test_logits_match_transformers(pair):
    hf, ours = pair
    tokens = torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(tokens).logits
        out = ours(tokens)
    err = (out - ref).abs().max().item()
    print(f"max |logits - HF| = {err:.2e}")
    assert out.shape == (3, 40, VOCAB) and out.dtype == torch.float32
    assert err < 1e-4


def test_rope_matches_meta_complex_formula():
    # Meta's reference: view pairs as complex numbers and multiply by e^{i p theta_k}
    B, T, H, D = 2, 9, 3, 16
    x = torch.randn(B, T, H, D)
    freqs = 1.0 / (10000.0 ** (torch.arange(0, D, 2)[: D // 2].float() / D))
    freqs_cis = torch.polar(torch.ones(T, D // 2), torch.outer(torch.arange(T).float(), freqs))
    ref = torch.view_as_real(torch.view_as_complex(x.reshape(B, T, H, D // 2, 2)) * freqs_cis[None, :, None]).flatten(3)
    cos, sin = rope_tables(D, T, 10000.0)
    assert torch.allclose(apply_rope(x, cos[None], sin[None]), ref, atol=1e-6)


def test_permutation_turns_meta_rope_into_hf_rope():
    """Independent of logits: rotating Meta-ordered q the Meta way, then permuting its features, equals
    permuting first and rotating the HF way (transformers' apply_rotary_pos_emb)."""
    B, T, H, D = 2, 11, 4, 16
    x = torch.randn(B, T, 32)
    w_meta = torch.randn(H * D, 32)
    q_meta = (x @ w_meta.T).view(B, T, H, D)
    q_hf = (x @ permute_for_hf(w_meta, H).T).view(B, T, H, D)
    cos, sin = rope_tables(D, T, 10000.0)
    rot_meta = apply_rope(q_meta, cos[None], sin[None])  # (B, T, H, D)
    cfg = LlamaConfig(hidden_size=H * D, num_attention_heads=H, rope_theta=10000.0, max_position_embeddings=T)
    hcos, hsin = LlamaRotaryEmbedding(cfg)(q_hf, torch.arange(T)[None].expand(B, T))
    rot_hf, _ = apply_rotary_pos_emb(q_hf.transpose(1, 2), q_hf.transpose(1, 2), hcos, hsin)  # (B, H, T, D)
    # the permutation acts on each head's D features exactly as on the rows of w
    rot_meta_as_hf = permute_for_hf(rot_meta.reshape(B * T, H * D).T, H).T.reshape(B, T, H, D)
    assert torch.allclose(rot_meta_as_hf, rot_hf.transpose(1, 2), atol=1e-5)
    assert torch.equal(unpermute_from_hf(permute_for_hf(w_meta, H), H), w_meta)


def test_doc_positions_restart_at_each_document():
    # RoPE scores depend only on relative positions, so logits alone cannot see the restart: check it directly
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1], [5, 5, 5, 5, 5, 5, 5, 5]])
    assert M.doc_positions(doc_ids).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_packed_documents_are_isolated(pair):
    _, ours = pair
    g = torch.Generator().manual_seed(2)
    lens = [[5, 7, 9, 3], [16, 8]]  # row 0 ends with a 3-token padded tail
    T = 24
    docs = [[torch.randint(0, VOCAB, (n,), generator=g) for n in row] for row in lens]
    tokens = torch.stack([torch.cat(row) for row in docs])
    doc_ids = torch.tensor([[0] * 5 + [1] * 7 + [2] * 9 + [-1] * 3, [0] * 16 + [1] * 8])
    with torch.no_grad():
        packed = ours(tokens, doc_ids)
        for flex in (False, True):  # per-document SDPA calls, and the flex_attention BlockMask CUDA uses
            if flex and M.create_block_mask is None:
                continue
            M.USE_FLEX = flex
            try:
                packed = ours(tokens, doc_ids)
            finally:
                M.USE_FLEX = None
            for r, row in enumerate(docs):
                s = 0
                for i, d in enumerate(row):
                    alone = ours(d[None])[0]
                    err = (packed[r, s: s + len(d)] - alone).abs().max().item()
                    assert err < 1e-5, f"row {r} doc {i} (flex={flex}): {err}"
                    s += len(d)
    assert s == T


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_sdpa_pads_16_bit_documents_on_cpu_exactly(dtype, monkeypatch):
    """ops.causal_sdpa (packed attention's per-document call): on CPU in bf16 each document reaches SDPA padded to
    a multiple of PAD_TO rows, so a run meets seq_len / PAD_TO lengths and not one kernel per length; in fp32 as
    it is. Either way the output and the gradients of q, k and v are causal attention over the document alone,
    written out in fp64 (tolerance: 2e-2 in bf16, its rounding; 1e-4 in fp32)."""
    from llama import ops
    lengths, real = [], F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, *a, **kw: lengths.append(q.shape[2]) or real(q, *a, **kw))
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    g = torch.Generator().manual_seed(0)
    for L in (1, 5, 64, 100, 130):
        q, k, v = (torch.randn(2, 3, L, 16, generator=g).to(dtype).requires_grad_() for _ in range(3))
        dout = torch.randn(2, 3, L, 16, generator=g).to(dtype)
        out = ops.causal_sdpa(q, k, v)
        got = [out, *torch.autograd.grad(out, (q, k, v), dout)]
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        scores = (q64 @ k64.transpose(-1, -2)) / 4 + torch.full((L, L), float("-inf"), dtype=torch.float64).triu(1)
        want = torch.softmax(scores, -1) @ v64
        want = [want, *torch.autograd.grad(want, (q64, k64, v64), dout.double())]
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
            assert a.shape == b.shape and a.dtype == dtype
            err = ((a.double() - b).abs().max() / b.abs().max().clamp(min=0.1)).item()  # L 1: dq is 0
            assert err <= tol, f"L {L} {name}: {err:.1e}"
    assert lengths == ([64, 64, 64, 128, 192] if dtype == torch.bfloat16 else [1, 5, 64, 100, 130])


@pytest.mark.skipif(M.create_block_mask is None, reason="this torch has no flex_attention")
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_mask_and_training_loss_isolate_documents(pair, monkeypatch):
    """The flex_attention path (CUDA's packing; forced here on CPU), two more ways than the logits above: its
    mask, evaluated at every (query, key), is exactly causal AND same-document (written out here); and the
    training forward (labels=) of a packed batch gives the summed loss of its documents run one by one with
    plain cross-entropy."""
    _, ours = pair
    monkeypatch.setattr(M, "USE_FLEX", True)
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, 3], [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]])
    mask = M.document_block_mask(doc_ids)
    assert isinstance(mask, M.BlockMask)
    B, T = doc_ids.shape
    for b in range(B):
        got = mask.mask_mod(torch.tensor(b), torch.tensor(0), torch.arange(T)[:, None], torch.arange(T)[None])
        d = doc_ids[b].tolist()
        assert got.tolist() == [[k <= q and d[k] == d[q] for k in range(T)] for q in range(T)]

    g = torch.Generator().manual_seed(4)
    lens = [[6, 9, 5], [12, 8]]
    docs = [[torch.randint(0, VOCAB, (n,), generator=g) for n in row] for row in lens]
    tokens = torch.stack([torch.cat(row) for row in docs])
    doc_ids = torch.tensor([[i for i, n in enumerate(row) for _ in range(n)] for row in lens])
    labels = torch.full_like(tokens, -100)  # next-token targets inside each document
    s = [0, 0]
    for r, row in enumerate(docs):
        for d in row:
            labels[r, s[r]: s[r] + len(d) - 1] = d[1:]
            s[r] += len(d)
    with torch.no_grad():  # (flex_attention has no backward on CPU)
        packed = ours(tokens, doc_ids, labels=labels).item()
        monkeypatch.setattr(M, "USE_FLEX", None)
        alone = sum(F.cross_entropy(ours(d[None])[0, :-1], d[1:], reduction="sum").item() for row in docs for d in row)
    assert abs(packed - alone) < 1e-4 * alone


def test_kv_cache_matches_full_forward(pair):
    _, ours = pair
    tokens = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = ours(tokens)
        ours.setup_cache(4, 32)
        try:
            steps = [ours(tokens[:, :6], start_pos=0), ours(tokens[:, 6:10], start_pos=6)]  # prefill in two chunks
            steps += [ours(tokens[:, t: t + 1], start_pos=t) for t in range(10, 20)]  # then one token at a time
        finally:
            ours.clear_cache()
    assert (torch.cat(steps, 1) - full).abs().max().item() < 1e-5
    assert all(layer.attention.cache_k is None for layer in ours.layers)


def test_return_hidden_is_pre_output(pair):
    _, ours = pair
    tokens = torch.randint(0, VOCAB, (1, 7))
    with torch.no_grad():
        assert torch.allclose(ours.output(ours(tokens, return_hidden=True)), ours(tokens), atol=1e-6)


def test_grad_checkpointing_gives_same_grads(pair):
    hf, _ = pair
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(4))
    doc_ids = torch.tensor([[0] * 10 + [1] * 6, [0] * 16])
    grads = []
    for ckpt in (False, True):
        model = ours_from(hf).train()
        model.grad_checkpointing = ckpt
        F.cross_entropy(model(tokens, doc_ids).flatten(0, 1), tokens.flatten()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n, g in grads[0].items():
        assert torch.allclose(g, grads[1][n], atol=1e-6), n


def test_resid_dropout():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**ARGS)).train()
    tokens = torch.randint(0, VOCAB, (1, 8))
    for block in model.layers:
        block.resid_dropout = 1.0  # every branch dropped: the residual stream is the embedding itself
    assert torch.allclose(model(tokens), model.output(model.norm(model.tok_embeddings(tokens))), atol=1e-6)
    model.eval()  # dropout is off outside training
    for block in model.layers:
        block.resid_dropout = 0.0
    ref = model(tokens)
    for block in model.layers:
        block.resid_dropout = 0.5
    assert torch.equal(model(tokens), ref)


def test_resize_embeddings(pair):
    hf, _ = pair
    model = ours_from(hf).to(torch.bfloat16)
    emb, out = model.tok_embeddings.weight.clone(), model.output.weight.clone()
    resize_embeddings(model, VOCAB + 2)  # two added special tokens -> rounded up to 384 rows
    assert model.args.vocab_size == 384 and model.tok_embeddings.weight.shape == (384, DIM)
    assert model.output.weight.shape == (384, DIM) and model.output.weight.dtype == torch.bfloat16
    assert torch.equal(model.tok_embeddings.weight[:VOCAB], emb) and torch.equal(model.output.weight[:VOCAB], out)
    for w, old in ((model.tok_embeddings.weight, emb), (model.output.weight, out)):
        assert torch.allclose(w[VOCAB:].float(), old.float().mean(0).expand(384 - VOCAB, -1), atol=1e-2)
    assert model(torch.tensor([[383, 5]])).shape == (1, 2, 384)
    resize_embeddings(model, 100)  # never shrinks
    assert model.tok_embeddings.weight.shape[0] == 384


def test_build_on_meta_then_assign(pair):
    hf, ours = pair
    with torch.device("meta"):
        model = Transformer(ModelArgs(**ARGS))
    model.load_state_dict(hf_to_meta_state_dict(hf, HEADS, KV_HEADS), strict=True, assign=True)
    model.init_rope("cpu")
    tokens = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        assert torch.equal(model.eval()(tokens), ours(tokens))


def test_rope_tables_stay_fp32_through_casts():
    model = Transformer(ModelArgs(**ARGS))
    cos = model.rope_cos.clone()
    model.to(torch.bfloat16)
    assert model.rope_cos.dtype == torch.float32 and torch.equal(model.rope_cos, cos)
    assert model.tok_embeddings.weight.dtype == torch.bfloat16
    with torch.device("meta"):
        empty = Transformer(ModelArgs(**ARGS))
    empty.to_empty(device="cpu")  # uninitialised storage: the RoPE tables must still be right
    assert torch.equal(empty.rope_cos, cos) and torch.equal(empty.rope_sin, rope_tables(DIM // HEADS, 128, 10000.0)[1])


def _saved_bytes(fn, *args) -> tuple[torch.Tensor, int]:
    """fn(*args) and the bytes autograd keeps for its backward (parameters and inputs given here excluded
    when they are only referenced: counted once per distinct storage)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, sum(storages.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_and_swiglu_match_plain_autograd_and_keep_less(dtype):
    """The two memory-saving autograd Functions against the textbook formulas run through plain autograd:
    the same forward bit for bit, the same gradients, and only their inputs kept for backward."""
    g = torch.Generator().manual_seed(0)
    N, D, H = 24, 64, 96
    tol = 1e-5 if dtype == torch.float32 else 2e-2

    def check(ours, ref, inputs):
        out, saved = _saved_bytes(ours, *inputs)
        grad_out = torch.randn(out.shape, generator=g).to(dtype)
        grads = torch.autograd.grad(out, inputs, grad_out)
        ref_out, ref_saved = _saved_bytes(ref, *inputs)
        ref_grads = torch.autograd.grad(ref_out, inputs, grad_out)
        assert torch.equal(out, ref_out)
        for a, b in zip(grads, ref_grads):
            assert a.dtype == b.dtype
            assert (a.float() - b.float()).abs().max() <= tol * b.float().abs().max()
        return saved, ref_saved

    # RMSNorm, Meta's formula: x * rsqrt(mean(x^2) + eps), cast back, times the weight
    norm = M.RMSNorm(D, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(D, generator=g) + 0.5)
    x = (torch.randn(2, N // 2, D, generator=g) * 3).to(dtype).requires_grad_()

    def ref_norm(x, w):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).type_as(x) * w
    saved, ref_saved = check(lambda x, w: norm(x), ref_norm, (x, norm.weight))
    elem = x.element_size()
    assert saved == N * D * elem + D * elem + N * 4  # x, the weight, one fp32 r per row
    assert ref_saved - saved >= N * D * 4  # plain autograd also keeps the normalised output (and in bf16 an fp32 x)

    # SwiGLU product silu(a) * b
    a = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
    b = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
    saved, ref_saved = check(swiglu, lambda a, b: F.silu(a) * b, (a, b))
    assert saved == 2 * N * H * elem and ref_saved == 3 * N * H * elem  # a, b (and silu(a) in plain autograd)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_ce_matches_autograd_cross_entropy(dtype):
    """The fused head loss (gradients taken in the forward, chunk by chunk, trained rows only) against plain
    autograd through F.cross_entropy on the full logits: loss, dL/dh and dL/dW, with ignored labels and a
    chunk that does not divide the rows."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(50, 16, generator=g) * 0.3).to(dtype).requires_grad_()
    labels = torch.randint(0, 50, (37,), generator=g)
    labels[[0, 5, 6, 30]] = -100
    ref = F.cross_entropy((h @ w.T).float(), labels, ignore_index=-100, reduction="sum")
    (ref * 0.5).backward()  # a non-unit upstream gradient, as the 1 / n_target scaling
    ref_gh, ref_gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    loss = head_ce(h, w, labels, chunk=8)
    (loss * 0.5).backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert abs(loss.item() - ref.item()) <= tol * abs(ref.item())
    for ours, theirs in ((h.grad, ref_gh), (w.grad, ref_gw)):
        assert ours.dtype == theirs.dtype
        assert (ours.float() - theirs.float()).abs().max() <= tol * theirs.float().abs().max()
    assert (h.grad[[0, 5, 6, 30]] == 0).all()  # ignored tokens get no gradient
    with torch.no_grad():  # evaluation: the same loss, no gradient work
        assert head_ce(h, w, labels, chunk=8).item() == loss.item()
    frozen = w.detach()  # a frozen head (LoRA): only dL/dh
    h.grad = None
    head_ce(h, frozen, labels, chunk=8).backward()
    assert h.grad is not None


def test_labels_give_hf_loss(pair):
    """model(tokens, labels=shifted) is the summed next-token loss over trained tokens: against transformers'
    own loss (a mean over the tokens its -100-masked, internally shifted labels keep), for a plain row and,
    with doc_ids, against each document run alone through HF."""
    hf, ours = pair
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, VOCAB, (1, 12), generator=g)
    hf_labels = tokens.clone()
    hf_labels[0, :4] = -100  # an untrained prompt
    labels = torch.cat([hf_labels[:, 1:], torch.full((1, 1), -100)], 1)  # ours: already shifted
    n = int((labels != -100).sum())
    with torch.no_grad():
        ref = hf(tokens, labels=hf_labels).loss.item() * n
        assert abs(ours(tokens, labels=labels).item() - ref) < 1e-4 * abs(ref)
        docs = [tokens[:, :5], tokens[:, 5:]]  # packed: the loss of each document alone, summed
        doc_ids = torch.tensor([[0] * 5 + [1] * 7])
        labels = torch.cat([torch.cat([d[:, 1:], torch.full((1, 1), -100)], 1) for d in docs], 1)
        ref = sum(hf(d, labels=d).loss.item() * (d.shape[1] - 1) for d in docs)
        assert abs(ours(tokens, doc_ids, labels=labels).item() - ref) < 1e-4 * abs(ref)
