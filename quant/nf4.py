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

We quantize with bitsandbytes itself (so weights interoperate with the HF stack) and do the compute here.
A weight is bitsandbytes' pair (packed bytes, QuantState) everywhere; `NF4Linear` keeps those tensors as
buffers and hands them out as that pair (`quant_state`). `dequantize_nf4` is the format's formula, bit-exact
with `bitsandbytes.functional.dequantize_4bit`; `nf4_matmul` computes x @ W.T either with the fused Triton
kernels in `triton_nf4.py` (CUDA), which never write the dense weight to memory, or in PyTorch, the whole
weight dequantized, then one matmul, through `cpu.py`: the same numbers arranged for speed (cache-sized
slices on CPU, bitsandbytes' C++ kernel, a reused buffer).
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


def dequantize_nf4(packed: torch.Tensor, quant_state) -> torch.Tensor:
    """Bit-exact `bitsandbytes.functional.dequantize_4bit(packed, quant_state)` in plain PyTorch: the weight of
    `quant_state.shape` in `quant_state.dtype`.

    w[i] = NF4[code(i)] * absmax[i // blocksize], the product in fp32 and rounded once to the dtype, as
    bitsandbytes does. Blocks run over the flattened weight; the last one may be short. (The products and
    `NF4Linear.dequantize` compute the same values faster: `cpu.py`.)"""
    s = quant_state
    if s.quant_type != "nf4":
        raise ValueError(f"dequantize_nf4: quant_type is {s.quant_type!r}, expected 'nf4'")
    shape = torch.Size(s.shape)
    n = shape.numel()
    data = packed.reshape(-1)
    codes = torch.stack((data >> 4, data & 15), dim=1).reshape(-1)[:n]  # high nibble first; odd n: drop padding
    absmax = dequantize_absmax(s).repeat_interleave(s.blocksize)[:n]    # each value's block absmax
    w = NF4.to(packed.device)[codes.int()] * absmax                     # fp32
    return w.to(s.dtype).view(shape)


def dequantize_absmax(quant_state) -> torch.Tensor:
    """fp32 absmax of every block, undoing the double quantization when the absmaxes are 8-bit:
    code2[absmax_u8[b]] * absmax2[b // blocksize2] + offset, the product rounded before the sum
    (as bitsandbytes)."""
    s = quant_state
    if not s.nested:
        return s.absmax.float()
    absmax2, n, group = s.state2.absmax, s.absmax.numel(), s.state2.blocksize
    whole = n - n % group                                     # blocks in whole groups of blocksize2
    out = s.state2.code.float().index_select(0, s.absmax.reshape(-1).int())
    out[:whole].view(-1, group).mul_(absmax2[: whole // group, None].float())
    if whole < n:
        out[whole:].mul_(absmax2[whole // group].float())
    return out.add_(s.offset.float())


# ---------------------------------------------------------------------------------------------
# x @ W.T with W in NF4. The weight is frozen: only x gets a gradient, and nothing dense is saved for
# backward (the weight is dequantized again there, which costs far less memory than keeping it).


def nf4_matmul(x: torch.Tensor, packed: torch.Tensor, quant_state, backend: str = "auto") -> torch.Tensor:
    """x [..., K] @ W.T -> [..., N] for an NF4 weight W [N, K] (bitsandbytes' packed data + QuantState).
    Differentiable in x; auto = the Triton kernels on CUDA, PyTorch elsewhere."""
    s = quant_state
    if s.quant_type != "nf4" or len(s.shape) != 2 or x.shape[-1:] != s.shape[1:]:
        raise ValueError(f"nf4_matmul: x {tuple(x.shape)} and a {s.quant_type} weight {tuple(s.shape)}; expected "
                         f"an nf4 weight [N, K] and x [..., K]")
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"nf4_matmul: backend {backend!r}, expected 'auto', 'torch' or 'triton'")
    return _NF4Matmul.apply(x, packed, s, backend)


class _NF4Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed, quant_state, backend):
        ctx.packed, ctx.quant_state, ctx.backend = packed, quant_state, backend  # not saved tensors: nothing dense
        return _matmul(x, packed, quant_state, backend, transpose=False)

    @staticmethod
    def backward(ctx, grad_y):
        return _matmul(grad_y, ctx.packed, ctx.quant_state, ctx.backend, transpose=True), None, None, None


def _matmul(x: torch.Tensor, packed: torch.Tensor, s, backend: str, transpose: bool) -> torch.Tensor:
    """x [..., K] @ W.T -> [..., N], or x [..., N] @ W -> [..., K] with transpose (the input gradient)."""
    if backend == "triton" or (backend == "auto" and x.is_cuda and _triton_available(x.device)):
        from . import triton_nf4  # optional: triton has Linux wheels only
        stats = (s.state2.absmax, s.state2.code, s.offset) if s.nested else ()
        return triton_nf4.nf4_gemm(x, packed, s.absmax, _nf4_levels(x.device), s.shape, *stats, transpose=transpose)
    absmax = dequantize_absmax(s)
    if x.device.type == "cpu":
        return cpu.matmul(x, packed, s, absmax, transpose)
    W = cpu.dense(packed, s, absmax, x.dtype)  # CUDA without the kernels: dequantize, then one matmul
    return x @ W if transpose else x @ W.t()


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
        import bitsandbytes.functional as bnbF  # here, not at the top: importing bitsandbytes takes seconds
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

    @property
    def quant_state(self):
        """This weight's bitsandbytes QuantState (over these buffers, no copies): with `packed`, what
        `dequantize_nf4`, `nf4_matmul` and bitsandbytes' own functions take."""
        from bitsandbytes.functional import QuantState  # here, not at the top: importing bitsandbytes takes seconds
        state2 = QuantState(absmax=self.absmax2, code=self.code2, blocksize=self.blocksize2, dtype=torch.float32)
        return QuantState(absmax=self.absmax, shape=torch.Size((self.out_features, self.in_features)),
                          code=_nf4_levels(self.packed.device), blocksize=self.blocksize, quant_type="nf4",
                          dtype=self.compute_dtype, offset=self.offset, state2=state2)

    def dequantize(self) -> torch.Tensor:
        """The dense weight [out, in] in the compute dtype (the fast path: the same values as dequantize_nf4)."""
        s = self.quant_state
        return cpu.dense(self.packed, s, dequantize_absmax(s), self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nf4_matmul(x, self.packed, self.quant_state)
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
