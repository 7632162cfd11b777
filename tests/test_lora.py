"""LoRA against independent references: the LoRA formula and its gradients written out in plain
autograd, HF PEFT on a tiny random transformers Llama (both directions of save/load), transformers
loading a merged export, and the NF4 base's own dequantize()."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quant
from lora import LoRALinear, apply_lora, count_parameters, load_adapter, merge_lora, save_adapter
from lora.dropout import drop_positions, keep_mask

TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def keep_prob(p: float) -> float:
    """LoRALinear's documented dropout probability: p rounded to a multiple of 2^-16."""
    return 1 - round(p * 2**16) / 2**16


def randomize_adapters(model: nn.Module, seed: int, std: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) * std)
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * std)


# ---------------------------------------------------------------------------------------------
# LoRALinear: formula, gradients, dropout, merge.


def test_lora_linear_formula_and_grads_against_plain_autograd():
    torch.manual_seed(0)
    for rslora in (False, True):
        base = nn.Linear(12, 10, bias=True).requires_grad_(False)
        m = LoRALinear(base, r=4, alpha=8, dropout=0.0, rslora=rslora)
        with torch.no_grad():
            m.lora_B.normal_()
        s = 8 / 4**0.5 if rslora else 8 / 4
        x = torch.randn(2, 5, 12, requires_grad=True)
        assert_matches_autograd(m, x, lambda xr, A, B: xr @ base.weight.T + base.bias + s * (xr @ A.T) @ B.T,
                                y_tol=1e-6)


def assert_matches_autograd(m, x, reference, seed=None, y_tol=1e-5):
    """m(x) and its gradients (x, lora_A, lora_B) against plain autograd through reference(x, A, B) on copies;
    `seed` is set before m(x) (it fixes the dropout mask)."""
    if seed is not None:
        torch.manual_seed(seed)
    y = m(x)
    g = torch.randn_like(y)
    y.backward(g)
    A, B, xr = (t.detach().clone().requires_grad_() for t in (m.lora_A, m.lora_B, x))
    yr = reference(xr, A, B)
    yr.backward(g)
    torch.testing.assert_close(y, yr, atol=y_tol, rtol=y_tol)
    for got, want in ((x.grad, xr.grad), (m.lora_A.grad, A.grad), (m.lora_B.grad, B.grad)):
        assert want.abs().max() > 0.1
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_dropout_gradients_with_the_same_mask(p):
    """Read the mask off a probe layer (A = B = I, W = 0, so y = c * x * mask), then replay the same
    seed on a random layer and compare output and gradients with plain autograd under that mask."""
    n, torch_seed = 16, 1234
    x = torch.randn(3, 7, n, requires_grad=True)
    probe = LoRALinear(nn.Linear(n, n, bias=False), r=n, alpha=n, dropout=p)
    with torch.no_grad():
        probe.base.weight.zero_()
        probe.lora_A.copy_(torch.eye(n))
        probe.lora_B.copy_(torch.eye(n))
    torch.manual_seed(torch_seed)
    keep = (probe(x) != 0).float()
    assert 0 < keep.mean() < 1

    base = nn.Linear(n, 9, bias=True).requires_grad_(False)
    m = LoRALinear(base, r=4, alpha=8, dropout=p)
    with torch.no_grad():
        m.lora_B.normal_()
    assert_matches_autograd(m, x, lambda xr, A, B: base(xr) + 2.0 * ((xr * keep / keep_prob(p)) @ A.T) @ B.T,
                            seed=torch_seed)

    # eval mode: no dropout at all
    m.eval()
    torch.testing.assert_close(m(x), base(x) + 2.0 * (x @ m.lora_A.T) @ m.lora_B.T, atol=1e-5, rtol=1e-5)


def test_dropout_rate():
    m = LoRALinear(nn.Linear(256, 256, bias=False), r=256, alpha=256, dropout=0.05)
    with torch.no_grad():
        m.base.weight.zero_()
        m.lora_A.copy_(torch.eye(256))
        m.lora_B.copy_(torch.eye(256))
    y = m(torch.randn(400, 256))
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.05) < 0.004  # 102400 draws: 5 sigma is 0.0034


@pytest.mark.parametrize("gaps", [True, False])  # CPU's drawn positions, CUDA's compared bits (run on CPU)
@pytest.mark.parametrize("p", [0.05, 0.5])
def test_dropout_plan_is_independent_bernoulli(p, gaps):
    """Against Bernoulli(q) with q = round(p * 2^16) / 2^16, within 5 sigma: the dropped fraction overall,
    in each of 64 blocks and at each position mod 4 and mod 7 (a bias in the bit lanes or in the gap sampling
    would show there); adjacent pairs dropped together (q^2) and runs of three (q^3): independence. The same
    seed replays the same plan; another seed does not."""
    n, seed = 1 << 20, 99
    q = round(p * 2**16) / 2**16

    def draw(seed):
        gen = torch.Generator().manual_seed(seed)
        return drop_positions(n, q, gen) if gaps else keep_mask(n, round(p * 2**16), gen, torch.float32)
    plan = draw(seed)
    if gaps:
        assert plan.dtype == torch.int64 and (plan.diff() > 0).all() and 0 <= plan.min() and plan.max() < n
        drop = torch.zeros(n, dtype=torch.bool)
        drop[plan] = True
    else:
        assert set(plan.unique().tolist()) == {0.0, 1.0}
        drop = plan == 0

    def near(observed: torch.Tensor, prob: float, trials: int):
        sigma = (prob * (1 - prob) / trials) ** 0.5
        assert (observed.double() - prob).abs().max() < 5 * sigma, (observed, prob)

    near(drop.double().mean(), q, n)
    near(drop.view(64, -1).double().mean(1), q, n // 64)
    for m in (4, 7):
        near(drop[: n - n % m].view(-1, m).double().mean(0), q, n // m)
    near((drop[:-1] & drop[1:]).double().mean(), q * q, n)
    near((drop[:-2] & drop[1:-1] & drop[2:]).double().mean(), q ** 3, n)

    again = draw(seed)
    assert torch.equal(plan, again)
    other = draw(seed + 1)
    assert other.shape != plan.shape or not torch.equal(plan, other)


def bf16(t: torch.Tensor) -> torch.Tensor:
    """t rounded to bf16, held in fp64."""
    return t.detach().to(torch.bfloat16).double()


def within_bf16_ulp(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Every element within one bf16 step (2^-7 of its magnitude at most) of the fp64 reference."""
    return bool(((got.double() - want).abs() <= 2**-7 * want.abs() + 1e-30).all())


def test_bf16_autocast_and_bf16_base():
    """Under bf16 autocast (fp32 base) and over a bf16 base: y and every gradient against the formula computed in
    fp64 from the bf16-rounded operands, rounded where the module documents it (the base output and h = x @ A.T
    in the base's dtype, then out + s * h @ B.T rounded once), within one bf16 step. A LoRA scale of 1.9 or 2.1
    instead of s = 16 / 8 = 2 moves the LoRA term, which dominates here (B ~ N(0, 1)), by 5%: several steps."""
    torch.manual_seed(0)
    base = nn.Linear(32, 24, bias=False).requires_grad_(False)
    m = LoRALinear(base, r=8, alpha=16, dropout=0.0)
    with torch.no_grad():
        m.lora_B.normal_()
    x = torch.randn(4, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    g = torch.randn(y.shape)
    y.float().backward(g)
    assert m.lora_A.grad.dtype == torch.float32 and m.lora_B.grad.dtype == torch.float32
    assert x.grad.dtype == torch.float32

    xb, W, A, B, gb = bf16(x), bf16(base.weight), bf16(m.lora_A), bf16(m.lora_B), bf16(g)
    h = bf16(xb @ A.T)                                  # [4, 8]
    lora_term = 2.0 * h @ B.T
    want = bf16(bf16(xb @ W.T) + lora_term)
    assert within_bf16_ulp(y, want)
    assert (0.05 * lora_term.abs() > 2**-6 * want.abs()).float().mean() > 0.8  # a 5% scale error: > 2 steps
    gh = 2.0 * bf16(gb @ B)                             # dL/dh, [4, 8] (x2 is exact)
    assert within_bf16_ulp(m.lora_B.grad, 2.0 * bf16(gb.T @ h))
    assert within_bf16_ulp(m.lora_A.grad, bf16(gh.T @ xb))
    lora_gx, base_gx = bf16(gh @ A), bf16(gb @ W)      # the adapter's and the base's input gradients
    assert ((x.grad.double() - lora_gx - base_gx).abs() <= 2**-7 * (lora_gx.abs() + base_gx.abs())).all()

    base16 = nn.Linear(32, 24, bias=False).to(torch.bfloat16).requires_grad_(False)
    m16 = LoRALinear(base16, r=8)
    x16 = x.detach().to(torch.bfloat16)
    y16 = m16(x16)
    y16.float().backward(g)
    assert y16.dtype == torch.bfloat16 and m16.lora_A.dtype == torch.float32
    assert torch.equal(y16, base16(x16))  # B = 0: the adapter adds exactly nothing
    assert m16.lora_A.grad.abs().sum() == 0  # B = 0: dL/dA = 0
    h16 = bf16(bf16(x16) @ bf16(m16.lora_A).T)  # dL/dB = s * g.T @ h, s = 32 / 8 (the defaults)
    assert within_bf16_ulp(m16.lora_B.grad, 4.0 * bf16(gb.T @ h16))


def test_merge_unmerge_round_trip():
    torch.manual_seed(0)
    base = nn.Linear(16, 12, bias=True).requires_grad_(False)
    w0 = base.weight.detach().clone()
    m = LoRALinear(base, r=4, alpha=8).eval()
    with torch.no_grad():
        m.lora_B.normal_()
    x = torch.randn(5, 16)
    y = m(x)
    m.merge()
    torch.testing.assert_close(base.weight, w0 + 2.0 * m.lora_B @ m.lora_A, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(m(x), y, atol=1e-5, rtol=1e-5)
    m.unmerge()
    torch.testing.assert_close(base.weight, w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(m(x), y, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Over NF4 (quant.NF4Linear): merge and memory.

def nf4_lora(n_in=64, n_out=48, dropout=0.0):
    torch.manual_seed(0)
    dense = nn.Linear(n_in, n_out, bias=False)
    q = quant.NF4Linear.from_linear(dense)
    m = LoRALinear(q, r=4, alpha=8, dropout=dropout)
    with torch.no_grad():
        m.lora_B.normal_()
    return m


def test_merge_over_nf4_equals_dequantize_then_merge():
    m = nf4_lora().eval()
    q = m.base
    x = torch.randn(6, 64)
    y = m(x)
    want = q.dequantize().float() + 2.0 * m.lora_B.detach() @ m.lora_A.detach()
    m.merge()
    assert type(m.base) is nn.Linear
    torch.testing.assert_close(m.base.weight.float(), want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(m(x), y, atol=1e-5, rtol=1e-5)
    m.unmerge()
    assert m.base is q


def _saved(fn):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return out, saved


def _bytes(tensors, exclude=()) -> int:
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(b for ptr, b in seen.items() if ptr not in skip)


def test_saved_tensors_over_nf4_hold_no_dense_weight():
    n_in, n_out, p = 128, 96, 0.1
    m = nf4_lora(n_in, n_out, dropout=p)
    x = torch.randn(4, 32, n_in, requires_grad=True)
    y, saved = _saved(lambda: m(x))
    for t in saved:  # nothing of the weight's size: no dequantized copy, no [N, out] temporaries
        assert t.numel() < n_in * n_out or t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr(), t.shape
    params = [*m.parameters(), *m.buffers()]
    ours = _bytes(saved, exclude=params)
    n_tok = x.shape[0] * x.shape[1]
    # x itself plus h = dropped x @ A.T [N, r] and at most small bookkeeping
    assert ours <= x.numel() * 4 + n_tok * m.r * 4 + 1024, ours

    # the plain composition over the same base keeps the dropout mask and the dropped copy of x
    def plain():
        return m.base(x) + m.scale * F.linear(F.linear(F.dropout(x, p, True), m.lora_A), m.lora_B)

    _, saved_plain = _saved(plain)
    assert ours < 0.6 * _bytes(saved_plain, exclude=params)
    y.sum().backward()  # and the backward runs from what was saved
    assert x.grad.abs().sum() > 0 and m.lora_A.grad.abs().sum() > 0


def test_qkv_share_one_saved_input():
    """Three adapters on the same input (q, k, v) keep one copy of it."""
    layers = [nf4_lora(64, 32, dropout=0.05) for _ in range(3)]
    x = torch.randn(8, 64, requires_grad=True)
    _, saved = _saved(lambda: [m(x) for m in layers])
    params = [t for m in layers for t in (*m.parameters(), *m.buffers())]
    assert _bytes(saved, exclude=params) <= x.numel() * 4 + 3 * (8 * 4 * 4) + 1024


# ---------------------------------------------------------------------------------------------
# Model level, against transformers + peft on a tiny random Llama with GQA.

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from llama import load_model, save_model  # noqa: E402

VOCAB, DIM, HIDDEN, LAYERS, HEADS, KV_HEADS = 96, 64, 160, 2, 4, 2


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=DIM, intermediate_size=HIDDEN, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, initializer_range=0.1)
    d = tmp_path_factory.mktemp("hf_llama")
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(3))


def hf_model(d) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()


def our_model(d):
    return load_model(d, dtype=torch.float32, device="cpu").eval()


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def our_logits(model, tokens):
    with torch.no_grad():
        return model(tokens)


def test_fresh_adapter_changes_nothing_and_counts_are_exact(hf_dir, tokens):
    model = our_model(hf_dir)
    before = our_logits(model, tokens)
    n_base = sum(p.numel() for p in model.parameters())
    r = 4
    apply_lora(model, r=r, alpha=8, dropout=0.05, targets=TARGETS)
    hd = DIM // HEADS
    per_layer = {"wq": (DIM, HEADS * hd), "wk": (DIM, KV_HEADS * hd), "wv": (DIM, KV_HEADS * hd),
                 "wo": (HEADS * hd, DIM), "w1": (DIM, HIDDEN), "w3": (DIM, HIDDEN), "w2": (HIDDEN, DIM)}
    want = LAYERS * sum(r * (n_in + n_out) for n_in, n_out in per_layer.values())
    assert count_parameters(model) == (want, n_base + want)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert len(trainable) == 2 * 7 * LAYERS
    torch.testing.assert_close(our_logits(model, tokens), before, atol=0, rtol=0)  # eval
    model.train()
    torch.testing.assert_close(our_logits(model, tokens), before, atol=0, rtol=0)  # dropout: still B = 0


def test_peft_reproduces_our_adapter(hf_dir, tokens, tmp_path):
    model = our_model(hf_dir)
    hf = hf_model(hf_dir)
    torch.testing.assert_close(our_logits(model, tokens), hf_logits(hf, tokens), atol=1e-4, rtol=0)
    base = hf_logits(hf, tokens)
    apply_lora(model, r=4, alpha=8, dropout=0.1, targets=TARGETS)
    randomize_adapters(model, seed=1)
    ours = our_logits(model.eval(), tokens)
    assert (ours - base).abs().max() > 0.1  # the adapter matters
    save_adapter(model, tmp_path, base_model_name_or_path="tiny-llama")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == sorted(HF_TARGETS) and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    peft = PeftModel.from_pretrained(hf, tmp_path).eval()
    diff = (hf_logits(peft, tokens) - ours).abs().max().item()
    print(f"our adapter -> PEFT: max |logit diff| {diff:.2e}")
    assert diff < 1e-4


def test_we_reproduce_a_peft_adapter(hf_dir, tokens, tmp_path):
    torch.manual_seed(5)
    hf = hf_model(hf_dir)
    peft = get_peft_model(hf, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=HF_TARGETS,
                                         task_type="CAUSAL_LM", use_rslora=True))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.1)
    peft.eval()
    want = hf_logits(peft, tokens)
    peft.save_pretrained(tmp_path)

    model = our_model(hf_dir)
    load_adapter(model, tmp_path)  # no LoRA yet: applied from adapter_config.json
    assert model.lora_config["r"] == 8 and model.lora_config["rslora"]
    diff = (our_logits(model.eval(), tokens) - want).abs().max().item()
    print(f"PEFT adapter -> ours: max |logit diff| {diff:.2e}")
    assert diff < 1e-4
    assert (want - hf_logits(hf_model(hf_dir), tokens)).abs().max() > 0.1

    again = our_model(hf_dir)  # into a model that already has matching LoRA
    apply_lora(again, r=8, alpha=16, dropout=0.0, rslora=True)
    load_adapter(again, tmp_path)
    torch.testing.assert_close(our_logits(again.eval(), tokens), want, atol=1e-4, rtol=0)


def test_modules_to_save_round_trip_with_peft(hf_dir, tokens, tmp_path):
    model = our_model(hf_dir)
    apply_lora(model, r=4, alpha=8, targets=("wq", "wv"), modules_to_save=("tok_embeddings", "output"))
    assert model.tok_embeddings.weight.requires_grad and model.output.weight.requires_grad
    randomize_adapters(model, seed=2)
    with torch.no_grad():
        model.tok_embeddings.weight[-3:].normal_()  # e.g. rows of added tokens
        model.output.weight.mul_(1.5)
    ours = our_logits(model.eval(), tokens)
    save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(cfg["modules_to_save"]) == ["embed_tokens", "lm_head"]
    assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
    peft = PeftModel.from_pretrained(hf_model(hf_dir), tmp_path).eval()
    diff = (hf_logits(peft, tokens) - ours).abs().max().item()
    print(f"our adapter + modules_to_save -> PEFT: max |logit diff| {diff:.2e}")
    assert diff < 1e-4
    fresh = our_model(hf_dir)
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(our_logits(fresh.eval(), tokens), ours, atol=1e-5, rtol=0)


def test_load_adapter_errors(hf_dir, tmp_path):
    model = our_model(hf_dir)
    apply_lora(model, r=4, alpha=8, targets=("wq", "w2"))
    save_adapter(model, tmp_path / "good")
    with pytest.raises(ValueError, match="r=4"):  # the model's LoRA has another rank
        load_adapter(apply_lora(our_model(hf_dir), r=8, alpha=8, targets=("wq", "w2")), tmp_path / "good")
    with pytest.raises(ValueError, match="not found"):
        load_adapter(our_model(hf_dir), tmp_path / "nowhere")

    sd = load_file(tmp_path / "good" / "adapter_model.safetensors")
    cfg = (tmp_path / "good" / "adapter_config.json").read_text()

    def variant(name, tensors):
        d = tmp_path / name
        d.mkdir()
        save_file(tensors, d / "adapter_model.safetensors")
        (d / "adapter_config.json").write_text(cfg)
        return d

    key = "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"
    missing = variant("missing", {k: v for k, v in sd.items() if k != key})
    with pytest.raises(ValueError, match="lora_A of layers.1.feed_forward.w2 is missing"):
        load_adapter(our_model(hf_dir), missing)
    no_module = variant("no_module", {k: v for k, v in sd.items() if ".layers.1.mlp.down_proj." not in k})
    with pytest.raises(ValueError, match="no adapter weights"):
        load_adapter(apply_lora(our_model(hf_dir), r=4, alpha=8, targets=("wq", "w2")), no_module)
    wrong = variant("shape", {**sd, key: torch.zeros(4, HIDDEN + 1)})
    with pytest.raises(ValueError, match="shape"):
        load_adapter(our_model(hf_dir), wrong)
    unknown = variant("unknown", {**sd, "base_model.model.model.layers.0.self_attn.foo_proj.lora_A.weight":
                                  torch.zeros(4, DIM)})
    with pytest.raises(ValueError, match="foo_proj"):
        load_adapter(our_model(hf_dir), unknown)
    extra = variant("extra", {**sd, "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight":
                              torch.zeros(4, DIM)})
    with pytest.raises(ValueError, match="lacks"):
        load_adapter(our_model(hf_dir), extra)


def test_merge_lora_then_export_meta_and_hf(hf_dir, tokens, tmp_path):
    model = our_model(hf_dir)
    apply_lora(model, r=4, alpha=8, targets=TARGETS)
    randomize_adapters(model, seed=3)
    want = our_logits(model.eval(), tokens)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in TARGETS)
    torch.testing.assert_close(our_logits(model, tokens), want, atol=1e-5, rtol=0)

    save_model(model, tmp_path / "hf", layout="hf")
    diff = (hf_logits(hf_model(tmp_path / "hf"), tokens) - want).abs().max().item()
    print(f"merged, HF layout, transformers vs our adapted model: max |logit diff| {diff:.2e}")
    assert diff < 1e-4
    save_model(model, tmp_path / "meta", layout="meta")
    torch.testing.assert_close(our_logits(our_model(tmp_path / "meta"), tokens), want, atol=1e-5, rtol=0)


def test_merge_lora_over_nf4_model(hf_dir, tokens):
    model = quant.quantize_model(our_model(hf_dir))
    apply_lora(model, r=4, alpha=8, targets=TARGETS)
    randomize_adapters(model, seed=4)
    want = our_logits(model.eval(), tokens)
    merge_lora(model)
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in TARGETS)
    torch.testing.assert_close(our_logits(model, tokens), want, atol=1e-4, rtol=0)


def test_dropout_masks_replay_under_grad_checkpointing():
    """Activation checkpointing recomputes the forward: the dropout seeds come from torch's RNG, which
    checkpoint restores, so the gradients equal those without checkpointing."""
    from llama import ModelArgs, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, multiple_of=16,
                                  max_seq_len=64))
    apply_lora(model, r=4, alpha=8, dropout=0.2)
    randomize_adapters(model, seed=6)
    tokens = torch.randint(0, VOCAB, (2, 16))
    grads = []
    for ckpt in (False, True):
        model.grad_checkpointing = ckpt
        model.train().zero_grad()
        torch.manual_seed(7)
        model(tokens).logsumexp(-1).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for n, g in grads[0].items():
        assert g.abs().max() > 0
        torch.testing.assert_close(grads[1][n], g, atol=1e-7, rtol=1e-6)


def test_rslora_adapter_round_trips_through_peft_ours_and_a_merged_export(hf_dir, tokens, tmp_path):
    """rsLoRA (s = alpha / sqrt(r)) at r 16: s = 32 / 4 = 8 where plain LoRA's alpha / r is 2, so an adapter read
    with the wrong rule is applied 4x too weakly. Our saved adapter must reproduce our logits in PEFT (on
    transformers' model) and in a fresh model of ours, and the merged export in transformers."""
    model = our_model(hf_dir)
    apply_lora(model, r=16, alpha=32, dropout=0.05, targets=TARGETS, rslora=True)
    assert all(m.scale == 8.0 for m in model.modules() if isinstance(m, LoRALinear))
    randomize_adapters(model, seed=7, std=0.05)
    want = our_logits(model.eval(), tokens)
    assert (want - hf_logits(hf_model(hf_dir), tokens)).abs().max() > 0.1  # the adapter matters
    for m in model.modules():  # and read at plain LoRA's scale, a quarter of it, it gives other logits
        if isinstance(m, LoRALinear):
            m.scale = 2.0
    assert (our_logits(model, tokens) - want).abs().max() > 0.05
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.scale = 8.0
    save_adapter(model, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is True and cfg["r"] == 16 and cfg["lora_alpha"] == 32

    peft = PeftModel.from_pretrained(hf_model(hf_dir), tmp_path / "adapter").eval()
    diff = (hf_logits(peft, tokens) - want).abs().max().item()
    print(f"our rsLoRA adapter -> PEFT: max |logit diff| {diff:.2e}")
    assert diff < 1e-4

    fresh = our_model(hf_dir)
    load_adapter(fresh, tmp_path / "adapter")
    assert fresh.lora_config["rslora"] and fresh.lora_config["r"] == 16
    torch.testing.assert_close(our_logits(fresh.eval(), tokens), want, atol=1e-4, rtol=0)

    merge_lora(model)
    save_model(model, tmp_path / "merged", layout="hf")
    diff = (hf_logits(hf_model(tmp_path / "merged"), tokens) - want).abs().max().item()
    print(f"merged rsLoRA, HF layout, transformers vs our adapted model: max |logit diff| {diff:.2e}")
    assert diff < 1e-4
