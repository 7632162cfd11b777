"""The CPU fast path of the NF4 products: the same numbers as nf4.py's reference path, arranged for a CPU.

Nothing here is needed for correctness; each piece exists for one reason:
- `_rows`: bitsandbytes' C++ dequantize kernel, one vectorized pass instead of our three PyTorch ops per
  slice, bit-identical to nf4.py's `_dequantize` (tests/test_nf4.py).
- `matmul` for decode-sized x (M <= 16): W is walked slice by slice, each slice dequantized into cache and
  used at once, so the dense weight never goes through memory (that traffic is the whole cost of a GEMV).
- `_dense_scratch` for training-sized x: the dense weight goes into one reused buffer per thread and dtype,
  because a fresh weight-sized tensor is fresh pages, whose faults and zeroing cost more than dequantizing.

`w` below is nf4.py's record of one frozen weight: `packed`, `shape` [N, K], `blocksize`, `scales()` (fp32
absmax per block) and `rows(scales, r0, r1, dtype)` (the reference dequantization of W[r0:r1]).
"""
import threading

import torch

SLICED_MAX_M = 16        # up to this many rows of x, the products go slice by slice through W
SLICE_VALUES = 1 << 20   # weights per slice: 4 MB in fp32, so a dequantized slice stays in cache


def _rows(w, scales: torch.Tensor, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
    """W[r0:r1] in `dtype`, bit-exact. bitsandbytes' kernel is only wrong when rows split blocks
    (K % blocksize != 0): those weights take the reference."""
    K = w.shape[1]
    if K % w.blocksize:
        return w.rows(scales, r0, r1, dtype)
    import bitsandbytes  # noqa: F401  registers torch.ops.bitsandbytes (a loaded NF4Linear never imported it)
    packed = w.packed.reshape(-1)[r0 * K // 2: r1 * K // 2]
    scales = scales[r0 * K // w.blocksize: r1 * K // w.blocksize]
    return torch.ops.bitsandbytes.dequantize_4bit.default(packed, scales, w.blocksize, "nf4",
                                                          torch.Size((r1 - r0, K)), dtype)


def _row_slices(w) -> list[tuple[int, int]]:
    """Row ranges of about SLICE_VALUES weights, each starting a block."""
    N, K = w.shape
    bs = w.blocksize
    rows = max(bs, SLICE_VALUES // K // bs * bs)              # a multiple of the blocksize: r0 * K % bs == 0
    return [(r0, min(N, r0 + rows)) for r0 in range(0, N, rows)]


def dense(w, dtype: torch.dtype) -> torch.Tensor:
    """The whole weight [N, K] in `dtype`, in a new tensor."""
    return _rows(w, w.scales(), 0, w.shape[0], dtype)


# Each dense weight of a product goes into one buffer per thread and dtype, grown to the largest weight seen
# (Llama-2-7B bf16: 90 MB), instead of a fresh tensor per call. Nothing dense outlives a product, so this is
# the whole of the dense memory, as one transient weight would be.
_scratch = threading.local()


def _dense_scratch(w, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight in this thread's reused buffer: valid until the next call, so only for one product."""
    bufs = _scratch.__dict__.setdefault("bufs", {})
    n = w.shape.numel()
    if dtype not in bufs or bufs[dtype].numel() < n:
        bufs.pop(dtype, None)  # free the smaller one first
        with torch.inference_mode(False):  # made under inference_mode it could never be written outside it
            bufs[dtype] = torch.empty(n, dtype=dtype)
    out = bufs[dtype][:n].view(w.shape)
    scales = w.scales()
    for r0, r1 in _row_slices(w):  # cache-sized slices: their temporaries are reused by malloc too
        out[r0:r1] = _rows(w, scales, r0, r1, dtype)
    return out


def matmul(w, x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """x [..., K] @ W.T -> [..., N], or x [..., N] @ W -> [..., K] with transpose (the input gradient).

    For M > SLICED_MAX_M rows the GEMM dwarfs the dequantization: the whole weight, then one matmul.
    Below it the products walk W slice by slice: a GEMV dequantizing the whole weight first would write and
    read it in full (32 MB of bf16 for a 4096x4096 weight) for one pass of arithmetic."""
    N, K = w.shape
    if not transpose:
        a = x.reshape(-1, K)                                  # (M, K)
        if a.shape[0] > SLICED_MAX_M:
            return x @ _dense_scratch(w, x.dtype).t()
        scales = w.scales()
        y_t = torch.empty(N, a.shape[0], dtype=x.dtype)       # y.T: each slice's outputs are contiguous rows
        for r0, r1 in _row_slices(w):                         # y[:, r0:r1] = x @ W[r0:r1].T
            torch.mm(_rows(w, scales, r0, r1, x.dtype), a.t(), out=y_t[r0:r1])
        return y_t.t().contiguous().view(*x.shape[:-1], N)
    b = x.reshape(-1, N)                                      # (M, N)
    if b.shape[0] > SLICED_MAX_M:
        return x @ _dense_scratch(w, x.dtype)
    # slices of W split the sum over N: the partial products add up in fp32 (W rounded to x's dtype first,
    # as in x @ W_dense)
    scales = w.scales()
    acc = torch.zeros(b.shape[0], K, dtype=torch.float32)
    for r0, r1 in _row_slices(w):
        acc.addmm_(b[:, r0:r1].float(), _rows(w, scales, r0, r1, x.dtype).float())
    return acc.to(x.dtype).view(*x.shape[:-1], K)
