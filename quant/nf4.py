"""4-bit NormalFloat (NF4) weights in bitsandbytes' exact format, and the layers that compute with them.

The format (QLoRA, Dettmers et al. 2023, section 3 and appendix E; bitsandbytes `quantize_4bit`):

    W (any shape) is flattened and cut into blocks of 64 values (the last block may be short; blocks run
    over the flattened weight, so with K % 64 != 0 a block spans two rows).
    per block:   absmax_b = max |w|;   q_i = argmin_j |w_i / absmax_b - NF4[j]|      (4 bits)
    packed:      byte k = q_{2k} << 4 | q_{2k+1}            (first value in the high nibble)
    double quant ("compress_statistics"): the fp32 absmaxes themselves are stored in 8 bits:
                 offset = mean(absmax);  (absmax - offset) is quantized blockwise (256 per block) with
                 bitsandbytes' 8-bit dynamic code `code2` and a per-256 fp32 scale `absmax2`
    dequant:     absmax_b = code2[absmax_u8[b]] * absmax2[b // 256] + offset
                 w_i = NF4[q_i] * absmax_b           (fp32 math, then cast to the weight dtype)

That is 4 bits per weight plus 8/64 + 32/(64*256) bits of statistics: 4.127 bits, so a 7B model's
projections take ~3.5 GB instead of 13 GB in bf16.

We quantize with bitsandbytes itself (so weights interoperate with the HF stack) and do the compute here:
`dequantize_nf4` is bit-exact with `bitsandbytes.functional.dequantize_4bit`, and `nf4_matmul` computes
x @ W.T either in PyTorch (the whole weight dequantized, then one matmul; on CPU the same numbers through the
cache-friendly path in `cpu.py`) or with the fused Triton kernels in `triton_nf4.py` (CUDA), which never
write the dense weight to memory.
"""
import functools

import torch
import torch.nn as nn

from . import cpu

# The 16 NF4 levels: quantiles of N(0, 1) normalised to [-1, 1], with an exact zero (QLoRA appendix E).
NF4 = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])

# byte -> its two values (high nibble first), the pair's 8 bytes viewed as one int64 (moved as bits, never
# as a float): one lookup per byte.
_PAIRS = torch.stack([NF4[torch.arange(256) >> 4], NF4[torch.arange(256) & 15]], dim=1)  # (256, 2) fp32
_PAIRS64 = _PAIRS.view(torch.int64).view(-1)                                          # (256,)

# Blocks per slice when dequantizing on CPU: 8192 blocks = 512K values, 2 MB of fp32, so the lookup's and
# the multiply's intermediates stay in cache and only the result goes to memory. GPUs take the whole weight
# in one launch per op.
_CPU_SLICE_BLOCKS = 8192


def _dequantize(packed: torch.Tensor, absmax: torch.Tensor, shape: torch.Size, dtype: torch.dtype,
                blocksize: int = 64) -> torch.Tensor:
    """Packed uint8 [(n+1)/2, ...] + fp32 absmax per block -> weight of `shape` in `dtype`.

    w[i] = NF4[code(i)] * absmax[i // blocksize], the product in fp32 and rounded once to `dtype`, as
    bitsandbytes does. Blocks run over the flattened weight; the last one may be short."""
    n = shape.numel()
    data = packed.reshape(-1)
    table = _PAIRS64.to(packed.device)
    out = torch.empty(n, dtype=dtype, device=packed.device)
    n_full = n // blocksize                                   # whole blocks
    step = _CPU_SLICE_BLOCKS if packed.device.type == "cpu" else max(n_full, 1)
    half = blocksize // 2                                     # bytes per block
    for b0 in range(0, n_full, step):
        b1 = min(n_full, b0 + step)
        # embedding-style lookup: int32 indices, one 8-byte element (two fp32 values) per byte
        pairs = table.index_select(0, data[b0 * half: b1 * half].int())            # (bytes,) int64
        values = pairs.view(torch.float32).view(b1 - b0, blocksize)                 # (blocks, 64) fp32
        # the product is fp32 and written straight into `dtype`: one rounding, no fp32 copy of the weight
        torch.mul(values, absmax[b0:b1, None], out=out[b0 * blocksize: b1 * blocksize].view(b1 - b0, blocksize))
    if n_full * blocksize < n:  # the short last block (with odd n, its last byte's low nibble is padding)
        tail = table.index_select(0, data[n_full * half:].int()).view(torch.float32)
        out[n_full * blocksize:] = tail[: n - n_full * blocksize] * absmax[n_full]
    return out.view(shape)


def dequantize_nf4(packed: torch.Tensor, quant_state) -> torch.Tensor:
    """Bit-exact `bitsandbytes.functional.dequantize_4bit(packed, quant_state)` in plain PyTorch."""
    s = quant_state
    if s.quant_type != "nf4":
        raise ValueError(f"dequantize_nf4: quant_type is {s.quant_type!r}, expected 'nf4'")
    return _dequantize(packed, _weight_from_state(packed, s).scales(), torch.Size(s.shape), s.dtype, s.blocksize)


# ---------------------------------------------------------------------------------------------
# x @ W.T with W in NF4. The weight is frozen: only x gets a gradient, and nothing dense is saved for
# backward (the weight is dequantized again there, which costs far less memory than keeping it).


class _Weight:
    """A frozen NF4 weight's tensors (no autograd state): packed [(N*K+1)/2] uint8, absmax per 64-block
    (uint8 with absmax2/code2/offset when double-quantized, else fp32), shape [N, K]."""

    def __init__(self, packed, absmax, absmax2, code2, offset, shape, blocksize, blocksize2):
        self.packed, self.absmax, self.absmax2, self.code2, self.offset = packed, absmax, absmax2, code2, offset
        self.shape, self.blocksize, self.blocksize2 = torch.Size(shape), blocksize, blocksize2

    def scales(self) -> torch.Tensor:
        """fp32 absmax of every block, undoing the double quantization when the absmaxes are 8-bit:
        code2[absmax_u8[b]] * absmax2[b // blocksize2] + offset, the product rounded before the sum
        (as bitsandbytes)."""
        if self.absmax2 is None:
            return self.absmax.float()
        n, group = self.absmax.numel(), self.blocksize2
        whole = n - n % group                                     # blocks in whole groups of blocksize2
        out = self.code2.float().index_select(0, self.absmax.reshape(-1).int())
        out[:whole].view(-1, group).mul_(self.absmax2[: whole // group, None].float())
        if whole < n:
            out[whole:].mul_(self.absmax2[whole // group].float())
        return out.add_(self.offset.float())

    def rows(self, scales: torch.Tensor, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
        """W[r0:r1] in `dtype` (bit-exact dequantization). Row r0 must start a block: r0 * K % blocksize == 0."""
        K = self.shape[1]
        i0, i1 = r0 * K, r1 * K                                   # the rows' range of the flattened weight
        assert i0 % self.blocksize == 0, (r0, K)
        packed = self.packed.reshape(-1)[i0 // 2: (i1 + 1) // 2]
        scales = scales[i0 // self.blocksize: -(-i1 // self.blocksize)]
        return _dequantize(packed, scales, torch.Size((r1 - r0, K)), dtype, self.blocksize)

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """The whole weight [N, K] in `dtype`, in a new tensor."""
        if self.packed.device.type == "cpu":
            return cpu.dense(self, dtype)  # CPU fast path (quant/cpu.py): the same values
        return self.rows(self.scales(), 0, self.shape[0], dtype)


def _matmul(w: _Weight, x: torch.Tensor, transpose: bool, backend: str) -> torch.Tensor:
    """x [..., K] @ W.T -> [..., N], or x [..., N] @ W -> [..., K] with transpose (the input gradient)."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"nf4_matmul: backend {backend!r}, expected 'auto', 'torch' or 'triton'")
    if backend == "triton" or (backend == "auto" and x.is_cuda and _triton_available(x.device)):
        from . import triton_nf4
        stats = (w.absmax2, w.code2, w.offset) if w.absmax2 is not None else ()
        return triton_nf4.nf4_gemm(x, w.packed, w.absmax, _nf4_levels(x.device), w.shape, *stats, transpose=transpose)
    if x.device.type == "cpu":
        return cpu.matmul(w, x, transpose)  # CPU fast path (quant/cpu.py): the same products, cache-sized
    W = w.dense(x.dtype)
    return x @ W if transpose else x @ W.t()


class _NF4Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, backend):
        ctx.weight, ctx.backend = weight, backend
        return _matmul(weight, x, False, backend)

    @staticmethod
    def backward(ctx, grad_y):
        return _matmul(ctx.weight, grad_y, True, ctx.backend), None, None


def _triton_available(device: torch.device) -> bool:
    """The kernels' bf16 tensor-core dots need sm_80 (A100) or newer; Triton itself may be missing."""
    if torch.cuda.get_device_capability(device) < (8, 0):
        return False
    try:
        from . import triton_nf4  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _nf4_levels(device: torch.device) -> torch.Tensor:
    return NF4.to(device)


def _weight_from_state(packed: torch.Tensor, s) -> _Weight:
    """bitsandbytes' packed data and QuantState as a _Weight."""
    if not s.nested:
        return _Weight(packed, s.absmax, None, None, None, s.shape, s.blocksize, 256)
    return _Weight(packed, s.absmax, s.state2.absmax, s.state2.code, s.offset, s.shape, s.blocksize, s.state2.blocksize)


def nf4_matmul(x: torch.Tensor, packed: torch.Tensor, quant_state, backend: str = "auto") -> torch.Tensor:
    """x [..., K] @ W.T -> [..., N] for an NF4 weight W [N, K] (bitsandbytes' packed data + QuantState).
    Differentiable in x; auto = the Triton kernels on CUDA, PyTorch elsewhere."""
    s = quant_state
    if s.quant_type != "nf4" or len(s.shape) != 2 or x.shape[-1:] != s.shape[1:]:
        raise ValueError(f"nf4_matmul: x {tuple(x.shape)} and a {s.quant_type} weight {tuple(s.shape)}; expected "
                         f"an nf4 weight [N, K] and x [..., K]")
    return _NF4Matmul.apply(x, _weight_from_state(packed, s), backend)


# ---------------------------------------------------------------------------------------------
# Modules.


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is NF4: y = x @ dequant(W).T (+ b).

    All of the format's tensors are buffers, so `.to(device)`, `state_dict()` and `load_state_dict()`
    work as for any module; nothing here requires grad."""

    def __init__(self, in_features: int, out_features: int, compute_dtype: torch.dtype = torch.bfloat16,
                 bias: bool = False, device=None):
        super().__init__()
        self.in_features, self.out_features, self.compute_dtype = in_features, out_features, compute_dtype
        self.blocksize, self.blocksize2 = 64, 256
        n = in_features * out_features
        n_blocks = -(-n // self.blocksize)
        self.register_buffer("packed", torch.zeros((n + 1) // 2, 1, dtype=torch.uint8, device=device))
        self.register_buffer("absmax", torch.zeros(n_blocks, dtype=torch.uint8, device=device))
        self.register_buffer("absmax2", torch.zeros(-(-n_blocks // self.blocksize2), device=device))
        self.register_buffer("code2", torch.zeros(256, device=device))
        self.register_buffer("offset", torch.zeros((), device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) / .half() cast every floating buffer; rounded, the fp32 statistics would
        # dequantize to other weights. They stay fp32: only a device move applies to them.
        stats = {k: self._buffers[k] for k in ("absmax2", "code2", "offset")}
        super()._apply(fn, recurse)
        for k, before in stats.items():
            after = self._buffers[k]
            if after.dtype != before.dtype:
                self._buffers[k] = before.to(after.device)
        return self

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    compute_dtype: torch.dtype | None = None) -> "NF4Linear":
        """Quantize with bitsandbytes (blocksize 64, double quantization), on the weight's device."""
        import bitsandbytes.functional as bnbF
        out_features, in_features = weight.shape
        compute_dtype = compute_dtype or weight.dtype
        m = cls(in_features, out_features, compute_dtype, bias is not None, device=weight.device)
        packed, s = bnbF.quantize_4bit(weight.detach().to(compute_dtype).contiguous(), blocksize=64,
                                       compress_statistics=True, quant_type="nf4")
        state = dict(packed=packed, absmax=s.absmax, absmax2=s.state2.absmax, code2=s.state2.code, offset=s.offset)
        if bias is not None:
            state["bias"] = bias
        m.load_state_dict(state)
        return m

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype | None = None) -> "NF4Linear":
        return cls.from_weight(linear.weight, linear.bias, compute_dtype)

    def _weight(self) -> _Weight:
        return _Weight(self.packed, self.absmax, self.absmax2, self.code2, self.offset,
                       (self.out_features, self.in_features), self.blocksize, self.blocksize2)

    @property
    def quant_state(self):
        """The bitsandbytes QuantState of this weight (for calling bitsandbytes' own functions)."""
        from bitsandbytes.functional import QuantState
        state2 = QuantState(absmax=self.absmax2, code=self.code2, blocksize=self.blocksize2, dtype=torch.float32)
        return QuantState(absmax=self.absmax, shape=torch.Size((self.out_features, self.in_features)),
                          code=NF4.to(self.packed.device), blocksize=self.blocksize, quant_type="nf4",
                          dtype=self.compute_dtype, offset=self.offset, state2=state2)

    def dequantize(self) -> torch.Tensor:
        """The dense weight [out, in] in the compute dtype."""
        return self._weight().dense(self.compute_dtype)

    def forward(self, x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        y = _NF4Matmul.apply(x, self._weight(), backend)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4, compute={self.compute_dtype}"


def quantize_model(model: nn.Module, skip: tuple[str, ...] = ("output", "tok_embeddings"),
                   compute_dtype: torch.dtype | None = None) -> nn.Module:
    """In place: every nn.Linear whose qualified name does not end in a `skip` entry becomes NF4Linear.
    QLoRA keeps the output head (and the embeddings, which are not linears) in 16 bits."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and not _skipped(full, skip):
                setattr(module, child_name, NF4Linear.from_linear(child, compute_dtype))
    return model


def quantize_on_load(skip: tuple[str, ...] = ("output", "tok_embeddings"),
                     compute_dtype: torch.dtype = torch.bfloat16):
    """A hook for `llama.load_model(..., hook=...)`: each 2-D "<module>.weight" not in `skip` becomes an
    NF4Linear as it streams off disk, so the dense model never exists in memory at once. Everything else
    (embeddings, norms, the skipped output head) comes back unchanged."""
    def hook(name: str, tensor: torch.Tensor) -> torch.Tensor | nn.Module:
        if not name.endswith(".weight") or tensor.ndim != 2 or _skipped(name.rsplit(".", 1)[0], skip):
            return tensor
        return NF4Linear.from_weight(tensor, compute_dtype=compute_dtype)
    return hook


def _skipped(module: str, skip: tuple[str, ...]) -> bool:
    """Whether the qualified module name is, or ends in, a `skip` entry ("output" matches "output" and "x.output")."""
    return any(module == s or module.endswith("." + s) for s in skip)
