"""quant/triton_nf4.py: the fused NF4 kernels against x @ W.T with W dequantized by bitsandbytes' own code.

Without CUDA these run in Triton's interpreter (conftest.py sets TRITON_INTERPRET=1), with one small tile
config; with CUDA the same tests run the compiled kernels. Shapes are tiny so the interpreter stays fast:
M = 1 (the GEMV's multiply-add path), 3 (GEMV on one 16-row MMA tile), 17 (the tiled GEMM); K = 64, 128
(whole 64-blocks per row, the ALIGNED path, one and two blocks per row), 200 (even K, blocks straddle
rows) and 7 (odd K: rows start on either nibble).

The bound on every comparison: one ulp of the output dtype (the kernel rounds once, from fp32) plus fp32
summation-order error, 2^-16 * (|x| @ |W|.T) for K <= 256. A wrong nibble or absmax is far above it.
"""
import copy

import bitsandbytes.functional as bnbF
import pytest
import torch
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

pytest.importorskip("triton", reason="triton is not installed (it has Linux wheels only); these tests need it to "
                    "run the NF4 kernels, compiled or in its interpreter")

import quant  # noqa: E402
from quant import triton_nf4  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def quantize(N: int, K: int, nested: bool, seed: int = 0):
    torch.manual_seed(seed)
    packed, s = bnbF.quantize_4bit(torch.randn(N, K), blocksize=64, compress_statistics=nested, quant_type="nf4")
    return packed, s


def to_device(packed, s):
    """(packed, QuantState) on DEVICE; the CPU originals stay for the reference."""
    s = copy.deepcopy(s)
    s.to(DEVICE)  # in place
    return packed.to(DEVICE), s


def weight(packed, s) -> tuple:
    """triton_nf4.nf4_gemm's weight arguments from bitsandbytes' packed data and QuantState."""
    stats = (s.state2.absmax, s.state2.code, s.offset) if s.nested else ()
    return (packed, s.absmax, s.code, s.shape, *stats)


def bnb_dense(packed, s) -> torch.Tensor:
    """W [N, K] in fp32 from bitsandbytes' generic dequantization and its own absmax decode (bnb 0.50.2's CPU
    kernel is wrong for even K % 64 != 0, see test_nf4.py, so not dequantize_4bit itself)."""
    absmax = (bnbF.dequantize_blockwise(s.absmax, s.state2) + s.offset) if s.nested else s.absmax
    return _dequantize_4bit_compute(packed.reshape(-1), absmax.float(), s.code, 64, s.shape, torch.float32)


def check(y: torch.Tensor, x: torch.Tensor, B: torch.Tensor, factor: float = 1.0) -> float:
    """y ~ x @ B with B the fp32 dense weight (or its transpose), B rounded to x's dtype as the kernels do.
    Returns the max abs error."""
    x, B_x = x.detach().cpu().float(), B.to(x.dtype).float()
    ref = x @ B_x
    bound = factor * (torch.finfo(y.dtype).eps * ref.abs() + 2**-16 * (x.abs() @ B_x.abs()))
    err = (y.detach().cpu().float() - ref).abs()
    assert (err <= bound).all(), f"max err {err.max():.3g}, worst excess {(err - bound).max():.3g}"
    return err.max().item()


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 64), (64, 128), (96, 200), (33, 7)])
@pytest.mark.parametrize("M", [1, 3, 17])
def test_nf4_gemm_matches_bitsandbytes_dequant(M, shape, dtype, nested):
    N, K = shape
    packed, s = quantize(N, K, nested)
    W = bnb_dense(packed, s)
    w = weight(*to_device(packed, s))
    torch.manual_seed(1)
    x = torch.randn(M, K).to(dtype)
    y = triton_nf4.nf4_gemm(x.to(DEVICE), *w, transpose=False)
    assert y.shape == (M, N) and y.dtype == dtype
    check(y, x, W.t())
    g = torch.randn(M, N).to(dtype)
    dx = triton_nf4.nf4_gemm(g.to(DEVICE), *w, transpose=True)
    assert dx.shape == (M, K) and dx.dtype == dtype
    check(dx, g, W)


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("M", [1, 3])
def test_split_k_slices_sum_to_the_product(M, transpose, monkeypatch):
    N, K = 96, 200
    packed, s = quantize(N, K, nested=True)
    W = bnb_dense(packed, s)
    w = weight(*to_device(packed, s))
    torch.manual_seed(1)
    x = torch.randn(M, N if transpose else K, dtype=torch.bfloat16)
    # 2 and 3 slices of 200 (or 96) in BLOCK_R steps; 7 leaves the last slices empty
    for splits in (1, 2, 3, 7):
        monkeypatch.setattr(triton_nf4, "_split_k", lambda C, R, n_sm: splits)
        y = triton_nf4.nf4_gemm(x.to(DEVICE), *w, transpose=transpose)
        check(y, x, W if transpose else W.t())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead", [(2, 5), (3, 7)])  # M = 10 (GEMV launch), 21 (GEMM)
def test_nf4_matmul_autograd_triton_vs_torch(lead, dtype):
    N, K = 96, 128
    packed, s = quantize(N, K, nested=True)
    W = bnb_dense(packed, s)
    torch.manual_seed(1)
    x = torch.randn(*lead, K, device=DEVICE).to(dtype).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y = quant.nf4_matmul(x, *to_device(packed, s), backend="triton")
    y_ref = quant.nf4_matmul(x_ref, *to_device(packed, s), backend="torch")
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    assert y.shape == (*lead, N) and x.grad.shape == x.shape and x.grad.dtype == dtype
    # both backends are within the bound of the exact product, so within twice it of each other
    check(y.reshape(-1, N), x.reshape(-1, K), W.t())
    check(y_ref.reshape(-1, N), x.reshape(-1, K), W.t())
    check(x.grad.reshape(-1, K), dy.reshape(-1, N), W)
    diff = (y.float() - y_ref.float()).abs()
    bound = 2 * (torch.finfo(dtype).eps * y_ref.float().abs() + 2**-16 * (x.abs().float() @ W.abs().t().to(DEVICE)))
    assert (diff <= bound).all()
    gdiff = (x.grad.float() - x_ref.grad.float()).abs()
    gbound = 2 * (torch.finfo(dtype).eps * x_ref.grad.float().abs() + 2**-16 * (dy.abs().float() @ W.abs().to(DEVICE)))
    assert (gdiff <= gbound).all()


def test_nf4linear_weight_through_the_triton_backend():
    """An NF4Linear's buffers, handed out as its QuantState, drive the kernels: the Triton product plus the bias
    is x @ W.T + b and deterministic, and the layer itself (backend "auto": these kernels on CUDA, the PyTorch
    path elsewhere) agrees with it."""
    torch.manual_seed(0)
    dense = torch.nn.Linear(200, 70, bias=True)
    lin = quant.NF4Linear.from_weight(dense.weight.data, dense.bias.data, torch.bfloat16).to(DEVICE)
    x = torch.randn(4, 3, 200, device=DEVICE, dtype=torch.bfloat16)

    def triton_layer():
        return quant.nf4_matmul(x, lin.packed, lin.quant_state, backend="triton") + lin.bias.to(x.dtype)
    y = triton_layer()
    assert y.shape == (4, 3, 70) and y.dtype == torch.bfloat16
    state = lin.quant_state
    state.to("cpu")
    W = bnb_dense(lin.packed.cpu(), state)
    check(y.reshape(-1, 70) - lin.bias.to(y.dtype), x.reshape(-1, 200), W.t(), factor=2)  # + the bias's rounding
    assert torch.equal(y, triton_layer())  # deterministic
    torch.testing.assert_close(y, lin(x), rtol=2**-7, atol=2**-7)


def test_strided_and_empty_inputs():
    N, K = 64, 128
    packed, s = quantize(N, K, nested=True)
    W = bnb_dense(packed, s)
    w = weight(*to_device(packed, s))
    x = torch.randn(K, 19).t()  # (19, K), row stride 1, column stride 19
    assert not x.is_contiguous()
    check(triton_nf4.nf4_gemm(x.to(DEVICE), *w), x, W.t())  # .to keeps the strides
    assert triton_nf4.nf4_gemm(torch.randn(0, 5, K, device=DEVICE), *w).shape == (0, 5, N)


def test_nf4_gemm_rejects_bad_input():
    packed, s = quantize(64, 128, nested=True)
    w = weight(packed, s)
    with pytest.raises(ValueError, match="x.shape"):
        triton_nf4.nf4_gemm(torch.randn(2, 64), *w)  # forward wants K = 128
    with pytest.raises(ValueError, match="dtype"):
        triton_nf4.nf4_gemm(torch.randn(2, 128, dtype=torch.float64), *w)
    strided = torch.cat([packed, packed], dim=1)[:, :1]  # right size, every other byte: not flat
    with pytest.raises(ValueError, match="contiguous"):
        triton_nf4.nf4_gemm(torch.randn(2, 128), *weight(strided, s))
    packed128, s128 = bnbF.quantize_4bit(torch.randn(64, 128), blocksize=128, compress_statistics=True,
                                         quant_type="nf4")
    with pytest.raises(ValueError, match="blocksize"):
        triton_nf4.nf4_gemm(torch.randn(2, 128), *weight(packed128, s128))
