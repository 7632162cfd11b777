"""The fast PyTorch path of the NF4 products: the same numbers as nf4.py's `dequantize_nf4`, arranged for a CPU.

nf4.py calls in with a weight as bitsandbytes' (packed, QuantState) pair and its fp32 block absmaxes
(`nf4.dequantize_absmax`, computed once per product); nothing here calls back. Nothing here is needed for
correctness; each piece exists for one reason:
- `_rows`: bitsandbytes' C++ dequantize kernel, one vectorized pass instead of several PyTorch ops,
  bit-identical to the formula (tests/test_nf4.py).
- `_lookup`, for weights whose rows split blocks (K % 64 != 0, where that kernel is wrong), and on CUDA
  without the Triton kernels: a 256-entry table maps each byte to its two values at once, in cache-sized
  slices on CPU, so only the result goes to memory.
- `matmul` for decode-sized x (M <= 16): W is walked slice by slice, each slice dequantized into cache and
  used at once, so the dense weight never goes through memory (that traffic is the whole cost of a GEMV).
- `_dense_scratch` for training-sized x: the dense weight goes into one reused buffer per thread and dtype,
  because a fresh weight-sized tensor is fresh pages, whose faults and zeroing cost more than dequantizing.
"""
import threading

import torch

SLICED_MAX_M = 16        # up to this many rows of x, the products go slice by slice through W
SLICE_VALUES = 1 << 20   # weights per slice: 4 MB in fp32, so a dequantized slice stays in cache

# Blocks per slice of the table lookup on CPU: 8192 blocks = 512K values, 2 MB of fp32, so the lookup's and
# the multiply's intermediates stay in cache and only the result goes to memory. GPUs take the whole weight
# in one launch per op.
LOOKUP_SLICE_BLOCKS = 8192
_BYTES = torch.arange(256)


def matmul(x: torch.Tensor, packed: torch.Tensor, state, absmax: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """x [..., K] @ W.T -> [..., N], or x [..., N] @ W -> [..., K] with transpose (the input gradient).

    For M > SLICED_MAX_M rows the GEMM dwarfs the dequantization: the whole weight, then one matmul.
    Below it the products walk W slice by slice: a GEMV dequantizing the whole weight first would write and
    read it in full (32 MB of bf16 for a 4096x4096 weight) for one pass of arithmetic."""
    N, K = state.shape
    if not transpose:
        a = x.reshape(-1, K)                                  # (M, K)
        if a.shape[0] > SLICED_MAX_M:
            return x @ _dense_scratch(packed, state, absmax, x.dtype).t()
        y_t = torch.empty(N, a.shape[0], dtype=x.dtype)       # y.T: each slice's outputs are contiguous rows
        for r0, r1 in _row_slices(state):                     # y[:, r0:r1] = x @ W[r0:r1].T
            torch.mm(_rows(packed, state, absmax, r0, r1, x.dtype), a.t(), out=y_t[r0:r1])
        return y_t.t().contiguous().view(*x.shape[:-1], N)
    b = x.reshape(-1, N)                                      # (M, N)
    if b.shape[0] > SLICED_MAX_M:
        return x @ _dense_scratch(packed, state, absmax, x.dtype)
    # slices of W split the sum over N: the partial products add up in fp32 (W rounded to x's dtype first,
    # as in x @ W_dense)
    acc = torch.zeros(b.shape[0], K, dtype=torch.float32)
    for r0, r1 in _row_slices(state):
        acc.addmm_(b[:, r0:r1].float(), _rows(packed, state, absmax, r0, r1, x.dtype).float())
    return acc.to(x.dtype).view(*x.shape[:-1], K)


def dense(packed: torch.Tensor, state, absmax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The whole weight [N, K] in `dtype`, in a new tensor (on CUDA too: the table lookup, one pass)."""
    if packed.device.type != "cpu":
        return _lookup(packed.reshape(-1), absmax, state.code, torch.Size(state.shape), dtype, state.blocksize)
    return _rows(packed, state, absmax, 0, state.shape[0], dtype)


def _rows(packed: torch.Tensor, state, absmax: torch.Tensor, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
    """W[r0:r1] in `dtype`, bit-exact. Row r0 must start a block: r0 * K % blocksize == 0. bitsandbytes'
    kernel is only wrong when rows split blocks (K % blocksize != 0): those weights take the table lookup."""
    K, bs = state.shape[1], state.blocksize
    i0, i1 = r0 * K, r1 * K                                   # the rows' range of the flattened weight
    assert i0 % bs == 0, (r0, K)
    data = packed.reshape(-1)[i0 // 2: (i1 + 1) // 2]
    if K % bs:
        return _lookup(data, absmax[i0 // bs: -(-i1 // bs)], state.code, torch.Size((r1 - r0, K)), dtype, bs)
    import bitsandbytes  # noqa: F401  registers torch.ops.bitsandbytes; here, as importing it takes seconds
    return torch.ops.bitsandbytes.dequantize_4bit.default(data, absmax[i0 // bs: i1 // bs], bs, "nf4",
                                                          torch.Size((r1 - r0, K)), dtype)


def _lookup(data: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, shape: torch.Size, dtype: torch.dtype,
            blocksize: int) -> torch.Tensor:
    """Packed bytes [(n+1)/2] + fp32 absmax per block -> weight of `shape` in `dtype`, through a table from
    each byte to its two values (high nibble first), the pair's 8 bytes viewed as one int64 (moved as bits,
    never as a float): one lookup per byte."""
    n = shape.numel()
    byte = _BYTES.to(code.device)
    pairs = torch.stack([code[byte >> 4], code[byte & 15]], dim=1).float()  # (256, 2) fp32
    table = pairs.view(torch.int64).view(-1).to(data.device)                # (256,)
    out = torch.empty(n, dtype=dtype, device=data.device)
    n_full = n // blocksize                                   # whole blocks
    step = LOOKUP_SLICE_BLOCKS if data.device.type == "cpu" else max(n_full, 1)
    half = blocksize // 2                                     # bytes per block
    for b0 in range(0, n_full, step):
        b1 = min(n_full, b0 + step)
        # embedding-style lookup: int32 indices, one 8-byte element (two fp32 values) per byte
        pair = table.index_select(0, data[b0 * half: b1 * half].int())          # (bytes,) int64
        values = pair.view(torch.float32).view(b1 - b0, blocksize)               # (blocks, 64) fp32
        # the product is fp32 and written straight into `dtype`: one rounding, no fp32 copy of the weight
        torch.mul(values, absmax[b0:b1, None], out=out[b0 * blocksize: b1 * blocksize].view(b1 - b0, blocksize))
    if n_full * blocksize < n:  # the short last block (with odd n, its last byte's low nibble is padding)
        tail = table.index_select(0, data[n_full * half:].int()).view(torch.float32)
        out[n_full * blocksize:] = tail[: n - n_full * blocksize] * absmax[n_full]
    return out.view(shape)


def _row_slices(state) -> list[tuple[int, int]]:
    """Row ranges of about SLICE_VALUES weights, each starting a block."""
    N, K = state.shape
    bs = state.blocksize
    rows = max(bs, SLICE_VALUES // K // bs * bs)              # a multiple of the blocksize: r0 * K % bs == 0
    return [(r0, min(N, r0 + rows)) for r0 in range(0, N, rows)]


# Each dense weight of a product goes into one buffer per thread and dtype, grown to the largest weight seen
# (Llama-2-7B bf16: 90 MB), instead of a fresh tensor per call. Nothing dense outlives a product, so this is
# the whole of the dense memory, as one transient weight would be.
_scratch = threading.local()


def _dense_scratch(packed: torch.Tensor, state, absmax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight in this thread's reused buffer: valid until the next call, so only for one product."""
    bufs = _scratch.__dict__.setdefault("bufs", {})
    shape = torch.Size(state.shape)
    n = shape.numel()
    if dtype not in bufs or bufs[dtype].numel() < n:
        bufs.pop(dtype, None)  # free the smaller one first
        with torch.inference_mode(False):  # made under inference_mode it could never be written outside it
            bufs[dtype] = torch.empty(n, dtype=dtype)
    out = bufs[dtype][:n].view(shape)
    for r0, r1 in _row_slices(state):  # cache-sized slices: their temporaries are reused by malloc too
        out[r0:r1] = _rows(packed, state, absmax, r0, r1, dtype)
    return out
