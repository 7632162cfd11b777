"""What a `--ckpt llama-2-7b` user runs on a GPU, checked on one against independent references.

Every test here is marked `cuda`: where CUDA is unavailable conftest.py skips it with the reason, so CI on CPU
is unchanged. benchmarks/gpu_suite.py runs this file (and test_triton_nf4.py, compiled) before its benchmarks.

- the Triton NF4 kernels, compiled: GEMM, GEMV and split-K, forward (x @ W.T) and input gradient (g @ W), bf16
  and fp16, at Llama-2-7B's projection shapes, against bitsandbytes' CUDA dequantization + an fp64 matmul;
- packed attention through compiled flex_attention: each document of a packed row gets the outputs (and
  parameter gradients) it gets run alone through plain causal SDPA;
- one QLoRA step in bf16 autocast on a 134M-parameter Llama: loss and every LoRA gradient against
  transformers + peft + bitsandbytes on the same weights, adapter and batch (benchmarks/parity.py, the same
  code bench_train.py gates its timing with), with HF's fp32 step as the reference for bf16's rounding;
- train.py, a few QLoRA steps on the GPU: the adapter it saves loads in PEFT and reproduces our logits.

The error bound for the kernels is the interpreter tests' (test_triton_nf4.py) at the summed length R: one ulp of
the output dtype (the kernel rounds once, from fp32) plus the worst case of R fp32 additions,
R * 2^-24 * (|a| @ |B|) (their 2^-16 is this at R = 256). At R = 4096..11008 a single wrong weight can hide under
it, which the interpreter tests catch at small R; what only a GPU shows (tiling, masks, pipelining, split-K sums)
goes wrong systematically, so each product must also be within one ulp in relative Frobenius norm.
"""
import functools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

pytestmark = pytest.mark.cuda
DEVICE = "cuda"
CUDA = torch.cuda.is_available()
SM80 = CUDA and torch.cuda.get_device_capability() >= (8, 0)
# without CUDA conftest.py's reason applies (no GPU); with an older GPU this one
needs_sm80 = pytest.mark.skipif(CUDA and not SM80, reason="the Triton NF4 kernels and bf16 need sm_80 (A100) or newer")

# (N, K) = (out_features, in_features) of Llama-2-7B's projections
SHAPES_7B = {"qkvo": (4096, 4096), "gate_up": (11008, 4096), "down": (4096, 11008)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------
# Triton NF4 kernels at 7B shapes


@functools.cache
def quantized(N: int, K: int):
    """(packed, QuantState, W): a random weight quantized by bitsandbytes (NF4, blocksize 64, double quant) on the
    GPU, and W [N, K] fp32 from bitsandbytes' own CUDA dequantization."""
    import bitsandbytes.functional as bnbF
    torch.manual_seed(0)
    w = torch.randn(N, K, device=DEVICE)
    packed, s = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    return packed, s, bnbF.dequantize_4bit(packed, s)


def kernel_weight(packed, s) -> tuple:
    """triton_nf4.nf4_gemm's weight arguments from bitsandbytes' packed data and QuantState."""
    stats = (s.state2.absmax, s.state2.code, s.offset) if s.nested else ()
    return (packed, s.absmax, s.code, s.shape, *stats)


def check(y: torch.Tensor, a: torch.Tensor, B: torch.Tensor) -> float:
    """y ~ a @ B, with B (fp32) rounded to a's dtype first as the kernels do; the reference in fp64. Returns the
    max error over the bound (<= 1)."""
    a64, B64 = a.double(), B.to(a.dtype).double()
    ref = a64 @ B64
    R = a.shape[-1]
    eps = torch.finfo(y.dtype).eps
    bound = eps * ref.abs() + R * 2**-24 * (a64.abs() @ B64.abs())
    err = (y.double() - ref).abs()
    worst = (err / bound).max().item()
    i = int((err / bound).argmax())
    assert worst <= 1, (f"error {err.flatten()[i]:.3g} at {divmod(i, y.shape[-1])} over its bound "
                        f"{bound.flatten()[i]:.3g} (output {y.flatten()[i].item():.4g}, reference {ref.flatten()[i]:.4g})")
    rel = (err.norm() / ref.norm()).item()
    assert rel <= eps, f"relative Frobenius error {rel:.3g} > one ulp ({eps:.3g}): a systematic error"
    return worst


def test_dequantize_nf4_matches_bitsandbytes_on_cuda():
    """Our PyTorch dequantizations on the GPU, the formula (dequantize_nf4) and the table lookup that the torch
    backend and merge_lora run (quant/cpu.py's dense): bit-exact on CPU (test_nf4.py); here an fma-contracted
    absmax decode in either may move a block's scale by one fp32 ulp."""
    import quant
    from quant import cpu, nf4
    for N, K in SHAPES_7B.values():
        packed, s, W = quantized(N, K)
        for ours in (quant.dequantize_nf4(packed, s), cpu.dense(packed, s, nf4.dequantize_absmax(s), torch.float32)):
            assert ours.dtype == W.dtype == torch.float32
            torch.testing.assert_close(ours, W, rtol=2**-22, atol=0)


# M = 1: the GEMV's multiply-add path; 5: GEMV on one 16-row MMA tile; 64: prefill-sized GEMM tiles;
# 2048: training-sized GEMM (the 256-row and 256-column tiles compete in autotuning)
@needs_sm80
@pytest.mark.parametrize("M", [1, 5, 64, 2048])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES_7B.values(), ids=SHAPES_7B.keys())
def test_triton_nf4_at_7b_shapes(shape, dtype, M):
    from quant import triton_nf4
    N, K = shape
    packed, s, W = quantized(N, K)
    w = kernel_weight(packed, s)
    g = torch.Generator(device=DEVICE).manual_seed(M)
    x = torch.randn(M, K, device=DEVICE, generator=g).to(dtype)
    y = triton_nf4.nf4_gemm(x, *w, transpose=False)  # forward: x @ W.T
    assert y.shape == (M, N) and y.dtype == dtype
    check(y, x, W.t())
    dy = torch.randn(M, N, device=DEVICE, generator=g).to(dtype)
    dx = triton_nf4.nf4_gemm(dy, *w, transpose=True)  # input gradient: dy @ W
    assert dx.shape == (M, K) and dx.dtype == dtype
    check(dx, dy, W)


@needs_sm80
@pytest.mark.parametrize("M", [1, 5])
def test_triton_split_k_at_7b_down_projection(M, monkeypatch):
    """Explicit slice counts of the summed dimension (11008 forward, 4096 backward), uneven ones included."""
    from quant import triton_nf4
    N, K = SHAPES_7B["down"]
    packed, s, W = quantized(N, K)
    w = kernel_weight(packed, s)
    g = torch.Generator(device=DEVICE).manual_seed(M)
    x = torch.randn(M, K, device=DEVICE, generator=g).to(torch.bfloat16)
    dy = torch.randn(M, N, device=DEVICE, generator=g).to(torch.bfloat16)
    for splits in (1, 3, 7, 64):
        monkeypatch.setattr(triton_nf4, "_split_k", lambda C, R, n_sm: splits)
        check(triton_nf4.nf4_gemm(x, *w, transpose=False), x, W.t())
        check(triton_nf4.nf4_gemm(dy, *w, transpose=True), dy, W)


@needs_sm80
@pytest.mark.parametrize("rows", [1, 1024], ids=["decode", "train"])
def test_nf4_matmul_autograd_runs_the_triton_kernels(rows, monkeypatch):
    """backend="auto" (what NF4Linear runs) must take the Triton kernels on this GPU, forward and backward."""
    import quant
    from quant import triton_nf4
    calls = []
    kernel = triton_nf4.nf4_gemm
    monkeypatch.setattr(triton_nf4, "nf4_gemm", lambda *args, transpose=False, **kw:
                        calls.append(transpose) or kernel(*args, transpose=transpose, **kw))
    packed, s, W = quantized(*SHAPES_7B["gate_up"])
    g = torch.Generator(device=DEVICE).manual_seed(rows)
    x = torch.randn(2, rows, W.shape[1], device=DEVICE, generator=g).to(torch.bfloat16).requires_grad_()
    y = quant.nf4_matmul(x, packed, s)
    dy = torch.randn(y.shape, device=DEVICE, generator=g).to(y.dtype)
    y.backward(dy)
    assert calls == [False, True], f"nf4_gemm calls (transpose flags): {calls}"
    check(y.reshape(-1, W.shape[0]), x.detach().reshape(-1, W.shape[1]), W.t())
    check(x.grad.reshape(-1, W.shape[1]), dy.reshape(-1, W.shape[0]), W)


# ---------------------------------------------------------------------------------------------
# Packed attention through compiled flex_attention


def _docs(lengths: list[list[int]], vocab: int, T: int):
    """tokens, doc_ids [B, T] for rows of documents (a row's remainder is padding, id -1) and the documents."""
    g = torch.Generator().manual_seed(0)
    tokens, doc_ids, docs = torch.zeros(len(lengths), T, dtype=torch.long), torch.full((len(lengths), T), -1), []
    for r, row in enumerate(lengths):
        s = 0
        for i, n in enumerate(row):
            d = torch.randint(0, vocab, (n,), generator=g)
            tokens[r, s: s + n], doc_ids[r, s: s + n] = d, i
            docs.append((r, s, d))
            s += n
        assert s <= T
    return tokens, doc_ids, docs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_packed_flex_attention_equals_documents_alone(dtype, monkeypatch):
    import llama.model as M
    from llama import ModelArgs, Transformer
    if M.create_block_mask is None:
        pytest.skip(f"torch {torch.__version__} has no flex_attention: packed rows use per-document SDPA")
    if dtype == torch.bfloat16 and not SM80:
        pytest.skip("bf16 needs sm_80 (A100) or newer")
    flex_calls = []
    flex = M._flex
    monkeypatch.setattr(M, "_flex", lambda *a: flex_calls.append(1) or flex(*a))
    T, vocab = 384, 512
    args = ModelArgs(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, multiple_of=64, max_seq_len=T)
    torch.manual_seed(0)
    model = Transformer(args).to(device=DEVICE, dtype=dtype).eval()
    # documents across the 128-token blocks of the BlockMask: whole, partial, one token, and a padded tail
    tokens, doc_ids, docs = _docs([[100, 157, 90], [384], [1, 127, 129, 127]], vocab, T)
    tokens, doc_ids = tokens.to(DEVICE), doc_ids.to(DEVICE)
    assert M._use_flex(doc_ids.device), "packed rows on CUDA must take the flex_attention path"
    out = model(tokens, doc_ids)  # (B, T, vocab)
    packed = out.detach()
    assert flex_calls and M._flex_compiled is not None, "flex_attention was not run compiled"
    # a fixed random weighting of each document's outputs: the packed row's gradient must be the documents' sum
    w = torch.randn(packed.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    mask = (doc_ids >= 0)[..., None]
    (out * w * mask).float().sum().backward()
    g_packed = {n: p.grad.float().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    tol = 2e-3 if dtype == torch.float32 else 3e-2  # fp32: TF32 in either kernel is allowed; bf16: ~4 ulps
    for r, s, d in docs:
        alone = model(d[None].to(DEVICE))[0]  # plain causal SDPA, positions from 0
        (alone * w[r, s: s + len(d)]).float().sum().backward()
        err = (packed[r, s: s + len(d)] - alone).float().abs().max().item()
        scale = alone.float().abs().max().item()
        assert err <= tol * scale, f"row {r}, document at {s} (length {len(d)}): max |packed - alone| {err:.3g}"
    for n, p in model.named_parameters():
        err = (g_packed[n] - p.grad.float()).abs().max().item()
        scale = p.grad.float().abs().max().item()
        assert err <= tol * scale, f"gradient of {n}: packed vs documents alone differ by {err:.3g} (max {scale:.3g})"


# ---------------------------------------------------------------------------------------------
# One QLoRA step against transformers + peft + bitsandbytes


@needs_sm80
def test_qlora_bf16_step_matches_transformers_peft_bitsandbytes(tmp_path):
    import parity
    r = parity.step0_parity(tmp_path, "qlora", "small", DEVICE, "bf16", seq_len=512, tokens_per_step=2048)
    print(f"loss ours {r['loss0_ours']:.5f} HF {r['loss0_hf']:.5f} HF fp32 {r['loss0_ref']:.5f}; worst gradient "
          f"{r['grad_worst']} {r['grad_rel_err']:.2e} of its max; from HF's fp32 step: ours {r['ours_vs_ref']}, "
          f"HF bf16 {r['hf_vs_ref']}")
    assert r["n_grads"] == 2 * 7 * parity.SIZES["small"]["n_layers"]  # lora_A and lora_B of 7 projections per layer
    assert not r["failures"], "; ".join(r["failures"])


# ---------------------------------------------------------------------------------------------
# train.py on the GPU


@needs_sm80
def test_train_py_qlora_on_gpu_saves_an_adapter_peft_loads(tiny_train_ckpt, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    import lora
    from llama import load_model, save_model
    ckpt, out = tiny_train_ckpt, tmp_path / "run"
    cmd = [sys.executable, "train.py", "--ckpt", str(ckpt), "--data", str(ckpt / "data.jsonl"), "--out", str(out),
           "--device", DEVICE, "--quant", "nf4", "--max-steps", "4", "--seq-len", "64", "--batch-size", "4",
           "--grad-accum", "1", "--lr", "3e-3"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"train.py exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    cfg = json.loads((out / "run_config.json").read_text())
    assert cfg["device"] == DEVICE and cfg["quant"] == "nf4"
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(math.isfinite(m["loss"]) for m in metrics) and metrics[-1]["peak_mem_mb"] > 0

    # PEFT on the same base weights (HF layout, fp32, CPU) against ours with the saved adapter
    hf_dir = tmp_path / "hf"
    save_model(load_model(ckpt, dtype=torch.float32, device="cpu"), hf_dir, layout="hf")
    ours = load_model(ckpt, dtype=torch.float32, device="cpu").eval()
    tokens = torch.randint(0, ours.args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = ours(tokens)
        lora.load_adapter(ours, out / "adapter")
        ours.eval()
        mine = ours(tokens)
        peft = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32),
                                         out / "adapter").eval()
        theirs = peft(tokens).logits
    assert (mine - base).abs().max() > 1e-4, "the trained adapter changes nothing"
    diff = (theirs - mine).abs().max().item()
    assert diff < 1e-4, f"PEFT with our adapter differs from ours by {diff:.2e}"
