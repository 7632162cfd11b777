"""Memory-saving versions of three of the model's operations, with their backward passes written out.

Each computes exactly what `llama/model.py` states in plain PyTorch, and keeps less for backward than
autograd would (tests/test_model.py checks forward, gradients and saved bytes against plain autograd):

- `rms_norm`: x * rsqrt(mean(x^2) + eps), cast back, times the weight; keeps x and one fp32 factor per row.
- `swiglu`: silu(a) * b; keeps a and b, not silu(a).
- `head_ce`: the output head and cross-entropy over trained tokens, its gradient taken in the forward pass
  one chunk of logits at a time, so the fp32 [tokens, vocab] logits never exist at once and are never
  recomputed.

And one that computes what it says but shapes it for the CPU:

- `causal_sdpa`: causal SDPA over one document, padded on CPU in 16 bits so that the kernels compiled per
  shape do not pile up (the packed-attention path, `model.attend_spans`); `head_ce` pads its chunks alike.
"""
import torch
import torch.nn.functional as F
from torch import Tensor


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return _RMSNormFn.apply(x, weight, eps)


class _RMSNormFn(torch.autograd.Function):
    """y = (x * r).type_as(x) * w, r = rsqrt(mean(x^2) + eps) in fp32, Meta's rounding (cast back before the weight).

    Plain autograd would keep the fp32 copy of x and the normalised output for backward (6 bytes per bf16
    element); this keeps x and r (2 bytes per element + one float per row). With xh = x * r and
    gn = dL/dy * w, the backward is dL/dx = r * (gn - xh * mean(gn * xh)) and dL/dw = sum over rows of
    dL/dy * xh."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        xf = x.float()
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # [..., 1]
        ctx.save_for_backward(x, weight, r)
        return (xf * r).type_as(x) * weight

    @staticmethod
    def backward(ctx, g: Tensor):
        x, weight, r = ctx.saved_tensors
        xh = x.float() * r
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gn = g.float() * weight.float()
            gx = (r * (gn - xh * (gn * xh).mean(-1, keepdim=True))).to(x.dtype)
        if ctx.needs_input_grad[1]:
            gw = (g.float() * xh.type_as(x).float()).flatten(0, -2).sum(0).to(weight.dtype)
        return gx, gw, None


def swiglu(a: Tensor, b: Tensor) -> Tensor:
    return _SwiGLUFn.apply(a, b)


class _SwiGLUFn(torch.autograd.Function):
    """silu(a) * b, keeping only a and b for backward (autograd would also keep silu(a): one [tokens, hidden]
    tensor per block). The backward recomputes silu(a) for dL/db and takes dL/da from aten's fused
    silu_backward (g * s * (1 + a * (1 - s)), s = sigmoid(a), in one pass), where written out in tensor ops it
    would be ten [tokens, hidden] temporaries."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:
        ctx.save_for_backward(a, b)
        return F.silu(a).mul_(b)

    @staticmethod
    def backward(ctx, g: Tensor):
        a, b = ctx.saved_tensors
        ga = None
        if ctx.needs_input_grad[0]:  # written over g * b: one fresh [tokens, hidden] tensor, not two
            gab = g * b
            ga = torch.ops.aten.silu_backward.grad_input(gab, a, grad_input=gab)
        gb = F.silu(a).mul_(g) if ctx.needs_input_grad[1] else None
        return ga, gb


# On CPU, bf16/fp16 matrix kernels (SDPA's, forward and backward, and the head's matmuls) are compiled for each
# shape they meet and kept for the life of the process, with no cap. Packed rows give every document its own
# length and every batch its own count of trained tokens, so a run would keep compiling kernels for new shapes
# and its memory would keep growing with them (past fp32's). Padded with zero rows to a multiple of PAD_TO, a run
# meets a few dozen shapes.
PAD_TO = 64


def pad16(t: Tensor, dim: int) -> Tensor:
    """t with zero rows appended along dim up to a multiple of PAD_TO when it is a 16-bit CPU tensor; else t."""
    n = -t.shape[dim] % PAD_TO if t.device.type == "cpu" and t.dtype in (torch.bfloat16, torch.float16) else 0
    return F.pad(t, [0, 0] * (t.ndim - 1 - dim) + [0, n]) if n else t


def causal_sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """F.scaled_dot_product_attention(q, k, v, is_causal=True) over [B, H, L, D], L padded by `pad16` and the
    output cut back to L rows. Exact: under the causal mask no real row attends to a later (padded) one, and the
    padded rows' outputs are dropped, so their gradient is zero and they add nothing to dK or dV."""
    L = q.shape[2]
    q, k, v = (pad16(t, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)[:, :, :L]


def head_ce(h: Tensor, weight: Tensor, labels: Tensor, chunk: int = 1024) -> Tensor:
    """Sum over rows of h [N, dim] of the cross-entropy of h @ weight.T against labels [N] (-100: ignored)."""
    keep = labels != -100
    h, labels = h[keep], labels[keep]  # the head only sees trained tokens: prompts and padding cost nothing
    grad = torch.is_grad_enabled()
    return _HeadCE.apply(h, weight, labels, chunk, grad and h.requires_grad, grad and weight.requires_grad)


class _HeadCE(torch.autograd.Function):
    """sum_i CE(h_i @ W.T, y_i) over rows h [n, dim] with labels y [n] (no ignored labels here).

    Cross-entropy is the graph's last op, so its gradient is known before backward starts:
    dL/dlogits = softmax(logits) - onehot(y). Computing it per chunk in the forward gives
    dL/dh = (p - onehot) @ W  [n, dim] and dL/dW = (p - onehot).T @ h  [V, dim] (when W trains) with
    one logits matmul per chunk; a checkpointed loss would compute the logits twice. backward only
    scales the stored gradients by the incoming one (1 / trained tokens)."""

    @staticmethod
    def forward(ctx, h, weight, labels, chunk: int, need_h: bool, need_w: bool):
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        gh = torch.empty_like(h) if need_h else None  # [n, dim]
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None  # [V, dim]
        for s in range(0, h.shape[0], chunk):
            y = labels[s: s + chunk]
            c = len(y)
            hc = pad16(h[s: s + c], 0)  # CPU, 16 bits: zero rows (PAD_TO), cut from loss and dL/dh, 0 in dL/dW
            logits = (hc @ weight.T).float()  # [c, V]; under autocast the matmul runs in the autocast dtype
            logp = torch.log_softmax(logits, dim=-1)  # one fused pass
            del logits
            total -= logp[:c].gather(1, y[:, None]).sum()
            if need_h or need_w:
                p = logp.exp_()  # softmax, in place
                p[torch.arange(c, device=y.device), y] -= 1  # - onehot(y)
                p = p.to(hc.dtype)
                if need_h:
                    gh[s: s + c] = (p @ weight)[:c]
                if need_w:
                    gw += (p.T @ hc).float()
        ctx.save_for_backward(gh, gw)
        ctx.w_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, g):
        gh, gw = ctx.saved_tensors
        gh = gh * g.to(gh.dtype) if gh is not None else None
        gw = (gw * g).to(ctx.w_dtype) if gw is not None else None
        return gh, gw, None, None, None, None
