"""LoRA's dropout, drawn from a seed so that the backward draws the same mask again instead of storing it.

A module of its own because it is machinery, not the idea: `lora.py` only needs "which elements of x are
zeroed for this seed". Each element drops independently with probability q = drop_codes(p) / 2^16 (p rounded
to a multiple of 2^-16, about 1e-5), and the same seed gives the same plan on the same device:

- CUDA (`keep_mask`): 16 random bits per element compared with a threshold; the 0/1 mask is applied by a
  multiply.
- CPU (`drop_positions`): torch's CPU generator is serial, so n random numbers per call are a visible part of
  a LoRA step. Only the ~q*n dropped positions are drawn, as the geometric gaps between drops, and only those
  elements are zeroed (`index_fill_`).
"""
import math

import torch


def drop_codes(p: float) -> int:
    return round(p * 2**16)  # dropout drops with probability drop_codes(p) / 2^16 (p to 1e-5) on every device


def drop_plan(n: int, p: float, seed: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Which of n elements dropout zeroes: on CPU the dropped positions (int64, ascending; `drop_positions`),
    elsewhere a 0/1 keep mask in `dtype` (`keep_mask`)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    if device.type == "cpu":
        return drop_positions(n, drop_codes(p) / 2**16, gen)
    return keep_mask(n, drop_codes(p), gen, dtype)


def keep_mask(n: int, codes: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """n values in `dtype`, each 0 with probability codes / 2^16, else 1: 16 random bits per element compared
    with a threshold (one int64 draw feeds four elements)."""
    # random_(-2**63, None): all 64 bits of each draw; randint(-2**63, 2**63 - 1) reduces modulo 2^64 - 1
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=gen.device).random_(-2**63, None, generator=gen)
    keep = torch.empty(n, dtype=dtype, device=gen.device)  # in dtype: applied by a multiply, cheaper than where()
    return torch.ge(bits.view(torch.int16)[:n], -2**15 + codes, out=keep)


def drop_positions(n: int, q: float, gen: torch.Generator) -> torch.Tensor:
    """The CPU trick: draw only the ~q*n dropped positions, not n random numbers (torch's CPU generator is serial).

    The gaps between drops in independent Bernoulli(q) trials are Geometric(q), floor(log(U) / log(1 - q))
    for U uniform on (0, 1], and their running sum is the positions; zeroing then touches ~q*n elements.
    Not for CUDA: its generator is parallel, and this loop would sync with the host on every call."""
    if q == 0:
        return torch.empty(0, dtype=torch.int64, device=gen.device)
    mean = n * q
    k = int(mean + 6 * math.sqrt(mean) + 64)  # gaps enough to pass n all but ~1e-9 of the time; else more
    parts, last = [], -1
    while last < n - 1:
        u = torch.rand(k, generator=gen, device=gen.device, dtype=torch.float64)  # [0, 1): 1 - u is in (0, 1]
        pos = torch.log1p(-u).div_(math.log1p(-q)).floor_().to(torch.int64).add_(1).cumsum_(0).add_(last)
        parts.append(pos)
        last = int(pos[-1])
    pos = torch.cat(parts) if len(parts) > 1 else parts[0]
    return pos[:int(torch.searchsorted(pos, n))]


def drop_(t: torch.Tensor, plan: torch.Tensor) -> torch.Tensor:
    """Zero t's dropped elements in place (t contiguous, plan = drop_plan(t.numel(), ...))."""
    flat = t.view(-1)
    if plan.is_floating_point():  # a 0/1 keep mask
        flat.mul_(plan)
    else:  # dropped positions (CPU)
        flat.index_fill_(0, plan, 0)
    return t


def dropped(t: torch.Tensor, dtype: torch.dtype, plan: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of t in dtype with the planned elements zeroed (one pass, then the zeros)."""
    return drop_(t.to(dtype, copy=True, memory_format=torch.contiguous_format), plan)
