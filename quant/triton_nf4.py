"""Fused NF4 dequantize-matmul kernels in Triton: x @ W.T and g @ W with W read straight from 4 bits.

W [N, K] is stored in bitsandbytes' NF4 format (see nf4.py): the flattened weight in blocks of 64,
two 4-bit codes per byte (first value in the high nibble), one absmax per block, itself 8-bit with a
per-256-block fp32 scale and an offset ("double quantization"):

    W[n, k] = NF4[code(i)] * absmax(i // 64),   i = n*K + k                (the flat index)
    code(i) = packed[i // 2] >> 4 if i is even else packed[i // 2] & 15
    absmax(b) = code2[absmax_u8[b]] * absmax2[b // 256] + offset           (fp32; or fp32 absmax[b])

Both products autograd needs are the same loop over a tile of W, with the roles of N and K swapped:

    forward    y  = x @ W.T   out[m, n] = sum_k x[m, k] * W[n, k]       (C = N outputs, R = K summed)
    backward   dx = g @ W     out[m, k] = sum_n g[m, n] * W[n, k]       (C = K outputs, R = N summed)

    for each output tile (m0, c0), and each slice [r_start, r_end) of R (split-K; one slice unless M is tiny):
        acc = zeros(BLOCK_M, BLOCK_C)                                   # fp32
        for r0 in range(r_start, r_end, BLOCK_R):
            a = A[m0:m0+BLOCK_M, r0:r0+BLOCK_R]                         # activations, 0 past the edges
            B = W[c0:.., r0:..].T  (forward)  or  W[r0:.., c0:..]  (backward)   # dequantized in registers
            acc += a @ B.to(a.dtype)                                    # tensor cores, fp32 accumulate
        out[slice, m0:.., c0:..] = acc                                  # slices summed afterwards

The dense weight never exists in memory: each program reads 4.13 bits per weight value it uses and
dequantizes in registers. `B.to(a.dtype)` rounds the weight to the activations' dtype first, exactly as
the PyTorch path (`x @ dequantize(W, x.dtype).T`) does, so the two backends differ only in summation order.

Two launch shapes of that one kernel, chosen by `nf4_gemm` from M (the number of rows of x):
- GEMM (M > 16: training, prefill): tiles of 32..256 rows, tensor cores, grouped tile order so that
  programs running together share weight tiles in L2; tiles autotuned per (M bucket, N, K, direction).
- GEMV (M <= 16: decode): a weight tile is used by at most 16 rows, so the work is reading 4-bit weights
  as fast as memory allows. M == 1 uses no tensor cores (a 2-D fp32 multiply-add accumulator, reduced once
  at the end); 2..16 rows pad to one 16-row MMA tile. Split-K cuts the summed dimension into slices run by
  separate programs when there are too few output tiles to occupy every SM (e.g. 70B's k/v projection,
  N = 1024), each slice written to an fp32 buffer and the slices summed in order (deterministic, no atomics).

The absmax decode on GPU may be contracted into one fma, which can move the scale by 1 fp32 ulp
(6e-8 relative) from bitsandbytes' two-step decode: far below the rounding of bf16/fp16 activations.

References: QLoRA (Dettmers et al. 2023) for the format; the Triton matmul tutorial
(03-matrix-multiplication.py) for the tiling, grouped ordering and masked loads.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# Triton reads TRITON_INTERPRET when a kernel is decorated (import time), so we read it once here too.
# The interpreter keeps bf16 as raw 16-bit integers: tl.dot multiplies those as integers, and fp32 -> bf16
# casts truncate. So there both operands of every dot are upcast to fp32 (products of bf16/fp16 values are
# exact in fp32: nothing else changes) and bf16 rounding is done by hand (_to).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

GEMV_MAX_M = 16  # up to this many rows of x: the GEMV / split-K launch


# ---------------------------------------------------------------------------------------------
# Dequantize one tile of W in registers.


@triton.jit
def _to(x, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """fp32 x rounded to `dtype`, to nearest even. The interpreter truncates fp32 -> bf16 instead, so there
    the bits are rounded by hand first: add just under half a bf16 ulp (plus the kept lowest bit, for ties
    to even) and clear the 16 bits bf16 drops; the cast then drops only zeros."""
    if INTERPRETED:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            x = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blk, mask, NESTED: tl.constexpr):
    """fp32 absmax of the 64-blocks `blk` (any shape of int32 block indices)."""
    if NESTED:  # absmax(b) = code2[absmax_u8[b]] * absmax2[b // 256] + offset
        q = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        scale2 = tl.load(absmax2_ptr + blk // 256, mask=mask, other=0.0)
        return tl.load(code2_ptr + q) * scale2 + tl.load(offset_ptr)
    else:
        return tl.load(absmax_ptr + blk, mask=mask, other=0.0)


@triton.jit
def _dequant_tile(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, nf4_ptr, n0, k0, N, K,
                  NESTED: tl.constexpr, ALIGNED: tl.constexpr, EVEN_K: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """W[n0:n0+BLOCK_N, k0:k0+BLOCK_K] in fp32. Past W's edges the values are finite garbage: every caller
    multiplies them by activations loaded as 0 there, or never stores the outputs they feed.
    EVEN_K: K % BLOCK_K == 0, so no column is past the edge and the loads need no mask along K."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    if ALIGNED:
        # K % 64 == 0 and k0 % min(BLOCK_K, 64) == 0: every row of the tile starts on a byte boundary
        # (n*K + k0 is even) and covers GROUPS whole 64-blocks, or part of one when BLOCK_K < 64. So load
        # the row's BLOCK_K / 2 bytes contiguously, split each byte into its two nibbles, and load one
        # absmax per (row, group) instead of one per value.
        GROUPS: tl.constexpr = (BLOCK_K + 63) // 64
        row = offs_n * K + k0                                                    # (BLOCK_N,) flat index
        offs_b = tl.arange(0, BLOCK_K // 2)
        offs_g = tl.arange(0, GROUPS)
        if EVEN_K:  # masks constant along the row: the loads stay vectorized (and pipelined: cp.async)
            b_ok = n_ok[:, None]
            g_ok = n_ok[:, None]
        else:
            b_ok = n_ok[:, None] & (k0 + 2 * offs_b[None, :] < K)
            g_ok = n_ok[:, None] & (k0 + 64 * offs_g[None, :] < K)
        byte = tl.load(packed_ptr + row[:, None] // 2 + offs_b[None, :], mask=b_ok, other=0)
        byte = byte.to(tl.int32)
        code = tl.interleave(byte >> 4, byte & 15)                              # (BLOCK_N, BLOCK_K)
        value = tl.load(nf4_ptr + code)                                         # NF4[code], fp32
        blk = row[:, None] // 64 + offs_g[None, :]                              # (BLOCK_N, GROUPS)
        scale = _block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blk, g_ok, NESTED)
        w = tl.reshape(value, (BLOCK_N, GROUPS, BLOCK_K // GROUPS)) * scale[:, :, None]
        return tl.reshape(w, (BLOCK_N, BLOCK_K))
    else:
        # Any K: a row may start on a low nibble and 64-blocks straddle rows, so index every value.
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            mask = n_ok[:, None]
        else:
            mask = n_ok[:, None] & (offs_k[None, :] < K)
        i = offs_n[:, None] * K + offs_k[None, :]                               # (BLOCK_N, BLOCK_K)
        byte = tl.load(packed_ptr + i // 2, mask=mask, other=0).to(tl.int32)
        code = (byte >> (4 - 4 * (i % 2))) & 15                                 # even i: high nibble
        scale = _block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, i // 64, mask, NESTED)
        return tl.load(nf4_ptr + code) * scale


# ---------------------------------------------------------------------------------------------
# The kernel: out[split] = A[:, slice] @ B[slice, :] with B = W.T (forward) or W (TRANSPOSE).


@triton.jit
def _nf4_matmul_kernel(
    a_ptr, out_ptr,                                                   # A [M, R] activations, out [SPLIT_K, M, C]
    packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, nf4_ptr,  # W [N, K] in NF4
    M, N, K,
    M_BUCKET,                                                         # only an autotuning key
    stride_am, stride_ar,
    stride_os, stride_om, stride_oc,
    TRANSPOSE: tl.constexpr,     # False: out = A @ W.T (R = K, C = N); True: out = A @ W (R = N, C = K)
    NESTED: tl.constexpr,        # absmax is 8-bit (double quantization)
    ALIGNED: tl.constexpr,       # K % 64 == 0: contiguous bytes and one absmax per 64 values of a row
    EVEN_R: tl.constexpr,        # R % BLOCK_R == 0 (set by _even below): no masks along R
    EVEN_C: tl.constexpr,        # C % BLOCK_C == 0: no masks along C inside the loop
    INTERPRETED: tl.constexpr,   # Triton's interpreter: work around its bf16 (see INTERPRET and _to)
    DOT_PRECISION: tl.constexpr,  # for fp32 activations: "ieee", or "tf32" when torch allows it
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    if TRANSPOSE:
        C = K
        R = N
    else:
        C = N
        R = K

    # Output tile of this program, in grouped order: GROUP_M row-tiles walk the columns together, so the
    # weight tiles they read are shared in L2 (tutorial 03, "L2 cache optimizations").
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_c = tl.cdiv(C, BLOCK_C)
    group = pid // (GROUP_M * num_pid_c)
    first_m = group * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_pid_c)) % group_m
    pid_c = (pid % (GROUP_M * num_pid_c)) // group_m

    # Slice of the summed dimension (split-K): whole BLOCK_R steps, so every slice but the last is full.
    split = tl.program_id(1)
    r_per_split = tl.cdiv(tl.cdiv(R, tl.num_programs(1)), BLOCK_R) * BLOCK_R
    r_start = split * r_per_split
    r_end = tl.minimum(R, r_start + r_per_split)  # (r_start >= R: an empty slice, its partial sum is 0)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    c0 = pid_c * BLOCK_C
    offs_c = c0 + tl.arange(0, BLOCK_C)
    m_ok = offs_m < M

    if BLOCK_M == 1:  # GEMV: accumulate products in 2-D, reduce across the tile once at the end
        if TRANSPOSE:
            acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)

    for r0 in range(r_start, r_end, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_ok = offs_r < R  # (slices are whole BLOCK_R steps: only the last step of all can be partial)
        # The tile of W, dequantized and rounded to the activations' dtype like the PyTorch path's weight.
        if TRANSPOSE:   # W[r0:, c0:], (BLOCK_R, BLOCK_C): already B
            w = _dequant_tile(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, nf4_ptr, r0, c0, N, K,
                              NESTED, ALIGNED, EVEN_C, BLOCK_R, BLOCK_C)
        else:           # W[c0:, r0:], (BLOCK_C, BLOCK_R): B transposed
            w = _dequant_tile(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, nf4_ptr, c0, r0, N, K,
                              NESTED, ALIGNED, EVEN_R, BLOCK_C, BLOCK_R)
        w = _to(w, a_ptr.dtype.element_ty, INTERPRETED)

        if BLOCK_M == 1:
            if EVEN_R:
                a = tl.load(a_ptr + pid_m * stride_am + offs_r * stride_ar)
            else:
                a = tl.load(a_ptr + pid_m * stride_am + offs_r * stride_ar, mask=r_ok, other=0.0)
            a = a.to(tl.float32)
            if TRANSPOSE:
                acc += w.to(tl.float32) * a[:, None]          # acc[r, c] += W[r, c] * g[r]
            else:
                acc += w.to(tl.float32) * a[None, :]          # acc[c, r] += W[c, r] * x[r]
        else:
            if EVEN_R:
                a_ok = m_ok[:, None]
            else:
                a_ok = m_ok[:, None] & r_ok[None, :]
            a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_r[None, :] * stride_ar,
                        mask=a_ok, other=0.0)                               # (BLOCK_M, BLOCK_R)
            if not TRANSPOSE:
                w = tl.trans(w)                                               # (BLOCK_R, BLOCK_C)
            if INTERPRETED:
                acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)

    if BLOCK_M == 1:
        if TRANSPOSE:
            y = tl.sum(acc, axis=0)
        else:
            y = tl.sum(acc, axis=1)
        tl.store(out_ptr + split * stride_os + pid_m * stride_om + offs_c * stride_oc,
                 _to(y, out_ptr.dtype.element_ty, INTERPRETED), mask=offs_c < C)
    else:
        tl.store(out_ptr + split * stride_os + offs_m[:, None] * stride_om + offs_c[None, :] * stride_oc,
                 _to(acc, out_ptr.dtype.element_ty, INTERPRETED), mask=m_ok[:, None] & (offs_c[None, :] < C))


# ---------------------------------------------------------------------------------------------
# Tile sizes. The Llama-2 projections (N x K = out x in) are
#     7B:  4096x4096 (q,k,v,o)  11008x4096 (gate,up)  4096x11008 (down)
#     13B: 5120x5120            13824x5120            5120x13824
#     70B: 8192x8192 (q,o)  1024x8192 (k,v: GQA, 8 kv heads)  28672x8192 (gate,up)  8192x28672 (down)
# so every N and K is a multiple of 64 (the ALIGNED path; one absmax per 64 weights of a row), training
# runs M = batch x seq = 2048..16384 rows and the backward is the same GEMM with N and K swapped.
# BLOCK_R and BLOCK_C are kept multiples of 64 wherever the K direction runs along them, so a row of a
# weight tile is whole absmax blocks.


def _cfg(m, c, r, warps, stages, group=8):
    return triton.Config({"BLOCK_M": m, "BLOCK_C": c, "BLOCK_R": r, "GROUP_M": group},
                         num_warps=warps, num_stages=stages)


def _gemv_cfg(c, r, warps, stages):  # BLOCK_M (1 or 16) is set by the wrapper
    return triton.Config({"BLOCK_C": c, "BLOCK_R": r, "GROUP_M": 1}, num_warps=warps, num_stages=stages)


# The software pipeliner stages the x tile, the packed bytes, the absmax and the gathered NF4 values in
# shared memory, once per stage; a config that does not fit a GPU's shared memory fails to compile there and
# autotuning skips it.
GEMM_CONFIGS = [
    # The workhorse (cuBLAS-sized tile). Each 128x64 weight tile dequantized in registers feeds 128 rows of
    # MMA, so dequantizing (~6 integer/float ops and one cached table load per weight) costs ~1/40 of the
    # tile's MMA FLOPs; 3 stages fit A100's shared memory.
    _cfg(128, 128, 64, 8, 3),
    # Training (M >= 4096): 256 rows per weight tile halve the dequantization per FLOP again, which is
    # what keeps the fused kernel near cuBLAS there; the 256x128 fp32 accumulator is 128 registers a thread
    # at 8 warps, the most that still leaves room for the dequantization (fits H100's shared memory only).
    _cfg(256, 128, 64, 8, 3),
    # Wide outputs (gate/up: N = 11008, 13824, 28672; and the backward's C = K of down): a 256-wide output
    # tile reads each activation tile once for twice the columns (H100 only, as above).
    _cfg(128, 256, 64, 8, 3),
    # Prefill and short batches (M = 64..1024), and the narrow 70B k/v projection (N = 1024): smaller tiles
    # give enough programs to fill 108..132 SMs; 4 stages hide the global-load latency of a shorter tile.
    _cfg(64, 128, 64, 4, 4),
    # Long reductions with few output tiles (down: K = 11008..28672 at small M): a 128-deep step halves
    # the loop trips and the 64x64 output keeps the grid large.
    _cfg(64, 64, 128, 4, 4),
    # M = 17..64: one 32-row tile of x per weight tile, 4 warps.
    _cfg(32, 128, 128, 4, 4),
]

GEMV_CONFIGS = [
    # Decode is bound by reading W (0.52 bytes per weight) once. A program covers BLOCK_C outputs and walks
    # its slice of R in BLOCK_R steps; a row of the weight tile is BLOCK_R/2 contiguous bytes (128 bytes at
    # 256: one full cache line per row). With M == 1 there is no dot for Triton to software-pipeline, so
    # the loads in flight come from occupancy: a program holds a BLOCK_C x BLOCK_R fp32 accumulator and
    # shared memory for the final reduction, small enough for several programs per SM, and split-K supplies
    # the programs when the output is narrow. The stages matter for M = 2..16, where the 16-row dot is
    # pipelined.
    _gemv_cfg(32, 256, 4, 3),
    _gemv_cfg(16, 512, 4, 3),
    _gemv_cfg(64, 128, 4, 4),
    _gemv_cfg(64, 256, 8, 3),
]

# K % 64 != 0 (no Llama shape, but any weight may come in): every value's byte and absmax are gathered one by
# one, and the software pipeliner stages those per-value gathers in shared memory too: at the 3-4 stages of the
# configs above that is more than any GPU has. One or two stages fit.
GEMM_CONFIGS_ANY_K = [_cfg(64, 64, 64, 4, 2), _cfg(128, 128, 64, 8, 1), _cfg(32, 64, 64, 4, 2)]
GEMV_CONFIGS_ANY_K = [_gemv_cfg(32, 128, 4, 1), _gemv_cfg(64, 128, 4, 1)]

if INTERPRET:
    # The interpreter runs every program in numpy: one small config each (and so no autotuning). Chosen to
    # exercise every branch of _dequant_tile's ALIGNED path: 64-wide rows (GEMM forward), 32-wide rows
    # (GEMM backward: part of one block) and two blocks per row (GEMV forward, BLOCK_R = 128).
    GEMM_CONFIGS = GEMM_CONFIGS_ANY_K = [_cfg(16, 32, 64, 4, 1)]
    GEMV_CONFIGS = GEMV_CONFIGS_ANY_K = [_gemv_cfg(64, 128, 4, 1)]



def _prune_gemm(configs: list, named_args: dict, **kwargs) -> list:
    """Row tiles much taller than M only multiply zeros: keep BLOCK_M <= max(32, M rounded up to 2^k)."""
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(32, named_args["M_BUCKET"])]
    return kept or configs[:1]


# Masks along the contiguous dimension of a load defeat vectorized (and asynchronous, pipelined) loads, so
# the tiles that divide the weight's dimensions, as on every Llama shape, are compiled without them.
_even = triton.heuristics({
    "EVEN_R": lambda a: (a["N"] if a["TRANSPOSE"] else a["K"]) % a["BLOCK_R"] == 0,
    "EVEN_C": lambda a: (a["K"] if a["TRANSPOSE"] else a["N"]) % a["BLOCK_C"] == 0,
})
_KEY = ["M_BUCKET", "N", "K", "TRANSPOSE"]  # (Triton adds the tensors' dtypes)
_gemm = triton.autotune(configs=GEMM_CONFIGS, key=_KEY,
                        prune_configs_by={"early_config_prune": _prune_gemm})(_even(_nf4_matmul_kernel))
_gemv = triton.autotune(configs=GEMV_CONFIGS, key=_KEY + ["BLOCK_M"])(_even(_nf4_matmul_kernel))
_gemm_any_k = triton.autotune(configs=GEMM_CONFIGS_ANY_K, key=_KEY,
                              prune_configs_by={"early_config_prune": _prune_gemm})(_even(_nf4_matmul_kernel))
_gemv_any_k = triton.autotune(configs=GEMV_CONFIGS_ANY_K, key=_KEY + ["BLOCK_M"])(_even(_nf4_matmul_kernel))


# ---------------------------------------------------------------------------------------------
# The wrapper: check, allocate, launch.


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: any small number
    return torch.cuda.get_device_properties(device).multi_processor_count


def _split_k(C: int, R: int, n_sm: int) -> int:
    """Slices of R for the GEMV: enough programs for ~4 per SM (counting BLOCK_C = 32 outputs per
    program), each summing at least 512 values so the slices' fp32 partial sums stay a small extra."""
    programs = triton.cdiv(C, 32)
    return max(1, min(4 * n_sm // programs, R // 512))


def nf4_gemm(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, shape: tuple[int, int],
             absmax2: torch.Tensor | None = None, code2: torch.Tensor | None = None,
             offset: torch.Tensor | float | None = None, *, transpose: bool = False) -> torch.Tensor:
    """x [..., K] @ W.T -> [..., N] (transpose=False), or g [..., N] @ W -> [..., K] (transpose=True), for the NF4
    weight W [N, K] = `shape` in bitsandbytes' format: `packed` uint8 [(N*K+1)/2], `absmax` one per 64 values
    (fp32, or uint8 with the double quantization's `absmax2` per 256 blocks, `code2` and `offset`), `code` the
    16 NF4 levels (fp32, on x's device). Output in x's dtype (bf16, fp16 or fp32), fp32 accumulation."""
    _check(x, packed, absmax, code, shape, absmax2, code2, transpose)
    N, K = shape
    R, C = (N, K) if transpose else (K, N)
    a = x.reshape(-1, R)  # (M, R); a view when it can be, strides passed as they are
    M = a.shape[0]
    out_shape = (*x.shape[:-1], C)
    if M == 0:
        return x.new_empty(out_shape)
    nested = absmax2 is not None
    if nested:
        absmax2, code2 = absmax2.float(), code2.float()
        offset = torch.as_tensor(offset, dtype=torch.float32, device=x.device)
    else:  # unused by the kernel (NESTED=False): any valid pointer
        absmax2 = code2 = offset = absmax
    aligned = K % 64 == 0
    meta = dict(TRANSPOSE=transpose, NESTED=nested, ALIGNED=aligned, INTERPRETED=INTERPRET,
                DOT_PRECISION="tf32" if x.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee")

    if M <= GEMV_MAX_M:
        block_m = 1 if M == 1 else 16
        splits = _split_k(C, R, _sm_count(x.device))
        # one slice writes the output directly; several write fp32 partial sums, added up below
        out = torch.empty((splits, M, C), device=x.device, dtype=x.dtype if splits == 1 else torch.float32)
        grid = lambda META: (triton.cdiv(M, block_m) * triton.cdiv(C, META["BLOCK_C"]), splits)  # noqa: E731
        kernel = _gemv if aligned else _gemv_any_k
        kernel[grid](a, out, packed, absmax, absmax2, code2, offset, code,
                     M, N, K, block_m, a.stride(0), a.stride(1), *out.stride(), BLOCK_M=block_m, **meta)
        y = out[0] if splits == 1 else out.sum(0).to(x.dtype)
    else:
        y = torch.empty((M, C), device=x.device, dtype=x.dtype)
        m_bucket = min(triton.next_power_of_2(M), 8192)
        grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(C, META["BLOCK_C"]), 1)  # noqa: E731
        kernel = _gemm if aligned else _gemm_any_k
        kernel[grid](a, y, packed, absmax, absmax2, code2, offset, code,
                     M, N, K, m_bucket, a.stride(0), a.stride(1), 0, y.stride(0), y.stride(1), **meta)
    return y.view(out_shape)


def _check(x, packed, absmax, code, shape, absmax2, code2, transpose: bool) -> None:
    """nf4_gemm's arguments, checked before anything is launched: a ValueError naming the one that is wrong."""
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"triton_nf4.nf4_gemm: x.dtype is {x.dtype}, expected bfloat16, float16 or float32")
    if len(shape) != 2:
        raise ValueError(f"triton_nf4.nf4_gemm: weight shape {tuple(shape)}, expected 2-D [N, K]")
    N, K = shape
    R = N if transpose else K
    if x.ndim == 0 or x.shape[-1] != R:
        raise ValueError(f"triton_nf4.nf4_gemm: x.shape {tuple(x.shape)}, expected [..., {R}] for a weight "
                         f"[{N}, {K}] with transpose={transpose}")
    n_blocks = triton.cdiv(N * K, 64)
    if packed.dtype != torch.uint8 or packed.numel() != (N * K + 1) // 2:
        raise ValueError(f"triton_nf4.nf4_gemm: packed is {packed.dtype} with {packed.numel()} values, "
                         f"expected uint8 with {(N * K + 1) // 2}")
    nested = absmax2 is not None
    want = torch.uint8 if nested else torch.float32
    if absmax.dtype != want or absmax.numel() != n_blocks:
        raise ValueError(f"triton_nf4.nf4_gemm: absmax is {absmax.dtype} with {absmax.numel()} values, expected "
                         f"{want} with {n_blocks} (the kernels take blocksize 64)")
    if nested and absmax2.numel() != triton.cdiv(n_blocks, 256):
        raise ValueError(f"triton_nf4.nf4_gemm: absmax2 has {absmax2.numel()} values, expected "
                         f"{triton.cdiv(n_blocks, 256)} (the kernels take blocksize 256 for the absmax)")
    if N * K >= 2**31:
        raise ValueError(f"triton_nf4.nf4_gemm: weight [{N}, {K}] has 2**31 values or more (int32 indexing)")
    tensors = [packed, absmax, code] + ([absmax2, code2] if nested else [])
    if any(t.device != x.device for t in tensors):
        raise ValueError(f"triton_nf4.nf4_gemm: x is on {x.device}, weight tensors on "
                         f"{sorted({str(t.device) for t in tensors})}")
    if not all(t.is_contiguous() for t in tensors):  # the kernel indexes them as flat arrays
        raise ValueError("triton_nf4.nf4_gemm: the weight's packed/absmax tensors must be contiguous")
    if x.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"triton_nf4.nf4_gemm: x is on {x.device}; the Triton kernels need CUDA "
                         "(or TRITON_INTERPRET=1 set before importing quant.triton_nf4)")
