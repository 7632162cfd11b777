"""LoRA: low-rank adapters on frozen linear layers, merging, and adapters in Hugging Face PEFT's format.

A LoRA layer keeps the base weight W [out, in] frozen and learns a rank-r update (Hu et al. 2021,
arXiv:2106.09685):

    y = base(x) + s * dropout(x) @ A.T @ B.T      A [r, in] Kaiming-uniform, B [out, r] zeros
    s = alpha / r                                  (rsLoRA, arXiv:2312.03732: s = alpha / sqrt(r))

B = 0 makes a fresh adapter an exact no-op. The base is an `nn.Linear` or any module with
`in_features`, `out_features` and `dequantize() -> [out, in]` (e.g. `quant.NF4Linear`, QLoRA:
arXiv:2305.14314); lora/ never imports quant.

Adapter weights are fp32 whatever the base dtype: Adam's small updates vanish in bf16's 8-bit
mantissa, and A and B are small (r * (in + out) values). Each call casts them to the base output's
dtype (bf16 under autocast or with a bf16 base) so both matmuls run at the base's precision.

PEFT format (what `PeftModel.from_pretrained` reads for `LlamaForCausalLM`): adapter_config.json
(peft_type LORA, r, lora_alpha, target_modules in HF names, ...) and adapter_model.safetensors with
keys `base_model.model.<HF module>.lora_A.weight` / `.lora_B.weight`, and full weights of
`modules_to_save` as `base_model.model.<HF module>.weight`. HF's checkpoint conversion permutes the
rows of wq and wk (rotary layout), so their lora_B rows get the same permutation on export.
"""
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llama.checkpoint import hf_to_meta_key, meta_to_hf_key, permute_for_hf, rotary_heads, unpermute_from_hf
from lora.dropout import drop_, drop_codes, drop_plan, dropped

PREFIX = "base_model.model."  # PEFT's prefix before the transformers module name


class LoRALinear(nn.Module):
    """y = base(x) + s * dropout(x) @ A.T @ B.T over a frozen `nn.Linear` or quantized linear.

    A [r, in] and B [out, r] are fp32 parameters (see the module docstring); s = alpha / r, or
    alpha / sqrt(r) with rslora. `merge()` folds s * B @ A into the base for inference.
    """

    def __init__(self, base: nn.Module, r: int = 16, alpha: float = 32, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        if r <= 0 or not 0 <= dropout < 1:
            raise ValueError(f"LoRA needs r > 0 and 0 <= dropout < 1, got r={r}, dropout={dropout}")
        self.base, self.r, self.alpha, self.dropout, self.rslora = base, r, alpha, dropout, rslora
        self.in_features, self.out_features = base.in_features, base.out_features
        self.scale = alpha / math.sqrt(r) if rslora else alpha / r
        device = next(base.parameters(), next(base.buffers(), torch.empty(0))).device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear (and PEFT) initialise A
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            return out
        p = self.dropout if self.training else 0.0
        seed = int(torch.randint(0, 2**62, ())) if p > 0 else 0  # from torch's global RNG: manual_seed fixes it
        c = self.scale / (1 - drop_codes(p) / 2**16)  # inverted dropout's 1/(1-p) folded into the scale
        return _LoRAFunction.apply(x, out.contiguous(), self.lora_A, self.lora_B, c, p, seed)

    def delta_weight(self) -> torch.Tensor:
        """s * B @ A [out, in] in fp32: what the adapter adds to the base weight."""
        return self.scale * (self.lora_B.detach().float() @ self.lora_A.detach().float())

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + s * B @ A [out, in], summed in fp32 and rounded once to the base's dtype: the weight `merge()` puts
        in place, as a new tensor (the module is not changed). A quantized base is dequantized first (see merge)."""
        w = self.base.dequantize() if hasattr(self.base, "dequantize") else self.base.weight
        return (w.float() + self.delta_weight().to(w.device)).to(w.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + s * B @ A. A quantized base is dequantized to a dense nn.Linear first: quantizing the
        merged weight again would round the small update s * B @ A away (NF4 steps are ~1/8 of a block's
        absmax, far larger than most of the update), throwing the adapter's precision away. The
        quantized base is kept so that `unmerge()` restores it exactly."""
        if self.merged:
            return
        w = self.merged_weight()
        if hasattr(self.base, "dequantize"):
            bias = getattr(self.base, "bias", None)  # [out]
            dense = nn.Linear(self.in_features, self.out_features, bias=bias is not None,
                              device=w.device, dtype=w.dtype).requires_grad_(False)
            if bias is not None:
                dense.bias.copy_(bias)
            object.__setattr__(self, "_quantized_base", self.base)  # unregistered: not in state_dict
            self.base = dense
        self.base.weight.copy_(w)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        quantized = self.__dict__.pop("_quantized_base", None)
        if quantized is not None:
            self.base = quantized
        else:
            w = self.base.weight
            w.copy_(w.float() - self.delta_weight().to(w.device))
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale:g}, dropout={self.dropout}, merged={self.merged}"


class _LoRAFunction(torch.autograd.Function):
    """out += c * (x * m) @ A.T @ B.T in place; out = base(x) comes from the base's own autograd.

    Backward, for g = dL/dy [N, out], m the 0/1 dropout mask, c = s / (1 - p), xd = x * m:

        dL/dB = c * g.T @ (xd @ A.T)         [out, r]    (xd @ A.T = h [N, r] is saved from the forward)
        dL/dA = c * (g @ B).T @ xd           [r, in]
        dL/dx = base's input-grad + c * ((g @ B) @ A) * m

    Written by hand so that the adapter keeps only x (which q, k and v share) and h: the mask is drawn
    again in the backward from a per-call seed instead of being stored (lora/dropout.py), the dropped
    copy of x is recomputed, and the LoRA term is added into the base output in place (one addmm, no
    [N, out] temporaries). The base runs under its own autograd; a frozen NF4 base keeps only its
    packed weight, never a dequantized copy. benchmarks/bench_lora.py measures the saved bytes."""

    @staticmethod
    def forward(ctx, x, out, A, B, c: float, p: float, seed: int):
        with torch.autocast(x.device.type, enabled=False):  # dtypes are explicit: out's dtype
            dt = out.dtype
            x2 = x.reshape(-1, x.shape[-1])  # [N, in]
            if p > 0:  # a dropped copy of x; x itself is saved
                x2 = dropped(x2, dt, drop_plan(x2.numel(), p, seed, x.device, dt))
            else:
                x2 = x2.to(dt)
            h = x2 @ A.to(dt).T  # [N, r]
            if out._is_view():  # autograd cannot rebase an in-place custom op on a view: out of place
                y = torch.addmm(out.reshape(-1, out.shape[-1]), h, B.to(dt).T, alpha=c).view(out.shape)
            else:  # the GEMM adds into base(x): no [N, out] temporaries
                y = out
                out.view(-1, out.shape[-1]).addmm_(h, B.to(dt).T, alpha=c)  # [N, out]
                ctx.mark_dirty(out)
        ctx.save_for_backward(x, h, A, B)  # x is not copied; q, k, v save the same tensor
        ctx.c, ctx.p, ctx.seed = c, p, seed
        return y

    @staticmethod
    def backward(ctx, g):
        x, h, A, B = ctx.saved_tensors
        c, p = ctx.c, ctx.p
        gx = gA = gB = None
        with torch.autocast(g.device.type, enabled=False):
            dt = h.dtype
            g2 = g.reshape(-1, g.shape[-1]).to(dt)  # [N, out]
            gh = (g2 @ B.to(dt)).mul_(c)  # [N, r]
            plan = drop_plan(x.numel(), p, ctx.seed, x.device, dt) if p > 0 else None
            if ctx.needs_input_grad[2]:
                x2 = x.reshape(-1, x.shape[-1])
                x2 = dropped(x2, dt, plan) if p > 0 else x2.to(dt)
                gA = (gh.T @ x2).to(A.dtype)  # [r, in]
            if ctx.needs_input_grad[3]:
                gB = (g2.T @ h).mul_(c).to(B.dtype)  # [out, r]
            if ctx.needs_input_grad[0]:
                gx = gh @ A.to(dt)  # [N, in]
                if p > 0:
                    drop_(gx, plan)
                gx = gx.to(x.dtype).view(x.shape)
        return gx, g, gA, gB, None, None, None


# ---------------------------------------------------------------------------------------------
# Model level: apply, count, merge.


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; a quantized linear counts as its in * out (+ bias) weights."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = 0
    for m in model.modules():
        if hasattr(m, "dequantize"):
            total += m.in_features * m.out_features + (m.bias.numel() if getattr(m, "bias", None) is not None else 0)
        else:  # a quantized module's own parameters are its packed weights, counted above
            total += sum(p.numel() for p in m.parameters(recurse=False))
    return trainable, total


def apply_lora(model: nn.Module, r: int = 16, alpha: float = 32, dropout: float = 0.05,
               targets: tuple[str, ...] = ("wq", "wk", "wv", "wo", "w1", "w2", "w3"), rslora: bool = False,
               modules_to_save: tuple[str, ...] = ()) -> nn.Module:
    """Wrap every linear whose name ends in one of `targets` (Meta names) in a LoRALinear, in place.

    Afterwards only the adapters and the `modules_to_save` (e.g. "tok_embeddings", "output" when
    added tokens are trained; they train fully and are saved with the adapter) require grad.
    The settings are recorded in `model.lora_config` for `save_adapter`."""
    if getattr(model, "lora_config", None) is not None:
        raise ValueError("model already has LoRA adapters (merge_lora first, or load_adapter into it)")
    model.requires_grad_(False)  # the adapters created below require grad, as every new nn.Parameter
    found = set()
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and hasattr(child, "in_features"):
                setattr(module, child_name, LoRALinear(child, r, alpha, dropout, rslora))
                found.add(child_name)
    if missing := [t for t in targets if t not in found]:
        raise ValueError(f"LoRA targets {missing} match no linear layer of {type(model).__name__} "
                         f"(expected names like wq, wk, wv, wo, w1, w2, w3)")
    for name in modules_to_save:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"modules_to_save: {type(model).__name__} has no module {name!r}") from None
        if hasattr(module, "dequantize"):
            raise ValueError(f"modules_to_save: {name!r} is quantized; a fully trained module must stay dense")
        module.requires_grad_(True)
    model.lora_config = dict(r=r, alpha=alpha, dropout=dropout, targets=tuple(targets), rslora=rslora,
                             modules_to_save=tuple(modules_to_save))
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base and put the base back: a plain model (nn.Linear where a
    quantized base was) with the same outputs, ready for `llama.save_model`."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                child.merge()
                setattr(module, name, child.base)
    model.lora_config = None
    return model


# ---------------------------------------------------------------------------------------------
# PEFT format: save and load.


def save_adapter(model: nn.Module, path: str | Path, base_model_name_or_path: str | None = None) -> None:
    """Write adapter_model.safetensors + adapter_config.json that PEFT loads onto the HF-layout model."""
    cfg = getattr(model, "lora_config", None)
    if cfg is None:
        raise ValueError("save_adapter: the model has no LoRA adapters (apply_lora first)")
    tensors, targets = {}, set()
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            if m.merged:
                raise ValueError(f"save_adapter: {name} is merged; unmerge() it first")
            hf = meta_to_hf_key(name)
            targets.add(hf.rsplit(".", 1)[-1])
            B = m.lora_B.detach()
            if heads := rotary_heads(model.args, name):
                B = permute_for_hf(B, heads)  # rows follow HF's rotary layout; A acts on inputs, unchanged
            tensors[f"{PREFIX}{hf}.lora_A.weight"] = m.lora_A.detach()
            tensors[f"{PREFIX}{hf}.lora_B.weight"] = B
    for name in cfg["modules_to_save"]:
        for pname, p in model.get_submodule(name).named_parameters():
            tensors[PREFIX + meta_to_hf_key(f"{name}.{pname}")] = p.detach()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(path / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": cfg["r"], "lora_alpha": cfg["alpha"], "lora_dropout": cfg["dropout"], "use_rslora": cfg["rslora"],
        "target_modules": sorted(targets),
        "modules_to_save": [meta_to_hf_key(n).rsplit(".", 1)[-1] for n in cfg["modules_to_save"]] or None,
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "use_dora": False, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
        "alpha_pattern": {}, "revision": None,
    }
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


@torch.no_grad()
def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Load an adapter saved by `save_adapter` or by PEFT (`save_pretrained` on an HF Llama) into `model`.

    A model without LoRA gets it from adapter_config.json first; a model with LoRA must match it
    (r, alpha, rslora, targets). Every adapter weight must be present with the right shape."""
    path = Path(path)
    pc = _read_adapter_config(path)
    w_file = path / "adapter_model.safetensors"
    lora, full = _read_adapter_weights(w_file)
    targets = tuple(sorted({n.rsplit(".", 1)[-1] for n in lora}))
    listed, held = pc.get("target_modules"), {meta_to_hf_key(n).rsplit(".", 1)[-1] for n in lora}
    if isinstance(listed, list) and {t.rsplit(".", 1)[-1] for t in listed} != held:  # (a str is a regex: not checked)
        raise ValueError(f"{path / 'adapter_config.json'}: target_modules {sorted(listed)}, but {w_file.name} holds "
                         f"adapters for {sorted(held)}")
    alpha, rslora = pc["lora_alpha"], bool(pc.get("use_rslora", False))
    if getattr(model, "lora_config", None) is None:
        apply_lora(model, r=pc["r"], alpha=alpha, dropout=pc.get("lora_dropout", 0.0), targets=targets,
                   rslora=rslora, modules_to_save=tuple(sorted({n.rsplit(".", 1)[0] for n in full})))
    else:
        have = model.lora_config
        mine = (have["r"], have["alpha"], have["rslora"], tuple(sorted(have["targets"])))
        if mine != (pc["r"], alpha, rslora, targets):
            raise ValueError(f"{path}: adapter has r={pc['r']}, lora_alpha={alpha}, use_rslora={rslora}, targets "
                             f"{targets}; the model's LoRA has r={mine[0]}, alpha={mine[1]}, rslora={mine[2]}, "
                             f"targets {mine[3]}")
    _copy_adapters(model, lora, w_file)
    for name, t in full.items():
        try:
            p = model.get_parameter(name)
        except AttributeError:
            raise ValueError(f"{w_file}: the model has no parameter {name!r}") from None
        if p.shape != t.shape:
            raise ValueError(f"{w_file}: {name} has shape {tuple(t.shape)}, the model's is {tuple(p.shape)} "
                             f"(resize the embeddings to the adapter's vocabulary first)")
        p.copy_(t)
    return model


def _read_adapter_config(path: Path) -> dict:
    """adapter_config.json of a PEFT LoRA folder, checked for what this loader supports."""
    cfg_file, w_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    for f in (cfg_file, w_file):
        if not f.exists():
            raise ValueError(f"load_adapter: {f} not found (expected a PEFT LoRA adapter folder)")
    pc = json.loads(cfg_file.read_text())
    if pc.get("peft_type") != "LORA":
        raise ValueError(f"{cfg_file}: peft_type {pc.get('peft_type')!r}, expected 'LORA'")
    unsupported = {k: pc[k] for k in ("use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern",
                                      "layers_to_transform", "lora_bias") if pc.get(k)}
    if pc.get("bias", "none") != "none":
        unsupported["bias"] = pc["bias"]
    if unsupported:
        raise ValueError(f"{cfg_file}: LoRA options this loader does not support: {unsupported}")
    return pc


def _read_adapter_weights(w_file: Path) -> tuple[dict, dict]:
    """(Meta module -> {"lora_A": A, "lora_B": B}, Meta parameter -> full weight of a modules_to_save)."""
    lora, full = {}, {}
    for key, t in load_file(str(w_file)).items():
        if not key.startswith(PREFIX):
            raise ValueError(f"{w_file}: key {key!r} does not start with {PREFIX!r}")
        try:  # hf_to_meta_key keeps what follows the module name (".lora_A.weight", ".weight")
            name = hf_to_meta_key(key.removeprefix(PREFIX).replace(".default.", "."))  # older PEFT kept ".default"
        except ValueError:
            raise ValueError(f"{w_file}: key {key!r} names no Llama module this model knows") from None
        module, _, which = name.removesuffix(".weight").rpartition(".")
        if name.endswith(".weight") and which in ("lora_A", "lora_B"):
            lora.setdefault(module, {})[which] = t
        else:  # a modules_to_save weight, e.g. tok_embeddings.weight
            full[name] = t
    return lora, full


def _copy_adapters(model: nn.Module, lora: dict, w_file: Path) -> None:
    """Every LoRALinear of the model gets its A and B from `lora`; each must be there with its shape."""
    wrapped = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    if missing := sorted(set(wrapped) - set(lora)):
        raise ValueError(f"{w_file}: no adapter weights for {len(missing)} modules, e.g. {missing[:3]}")
    if unexpected := sorted(set(lora) - set(wrapped)):
        raise ValueError(f"{w_file}: adapter weights for modules the model lacks, e.g. {unexpected[:3]}")
    for name, m in wrapped.items():
        for which, want in (("lora_A", (m.r, m.in_features)), ("lora_B", (m.out_features, m.r))):
            t = lora[name].get(which)
            if t is None:
                raise ValueError(f"{w_file}: {which} of {name} is missing")
            if tuple(t.shape) != want:
                raise ValueError(f"{w_file}: {which} of {name} has shape {tuple(t.shape)}, the model needs {want}")
            if which == "lora_B" and (heads := rotary_heads(model.args, name)):
                t = unpermute_from_hf(t, heads)  # HF rotary row order -> Meta's
            getattr(m, which).copy_(t)
