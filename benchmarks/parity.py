"""Step-0 parity between our training step and the Hugging Face stack's, on the same weights, adapter and batch.

Shared by benchmarks/bench_train.py (which refuses to time two stacks that disagree) and tests/test_gpu.py (one
QLoRA step in bf16 autocast on CUDA). What "the same computation" means:

- weights: a random `LlamaConfig` model (norm weights randomised too) saved with `save_pretrained`; ours
  loads that folder with `llama.load_model`. The adapter (random B, so the LoRA path is not a no-op) is
  written by peft's `save_pretrained` and loaded by both.
- batch: the same SFT samples, raw (token ids, trained mask) pairs, packed by each side on its own. Ours:
  `pack` rows (the product's packing) with `doc_ids`. HF: `hf_rows`, written here without any of our code: the samples in
  their order, first fit into rows, `position_ids` restarting at 0 at each sample and no attention_mask, from
  which transformers builds the block-diagonal causal mask (`masking_utils.find_packed_sequence_indices`:
  TRL's padding-free packing), and labels in HF's convention (the token itself where trained; HF's loss
  shifts them). The rows may differ; both losses are the mean over the same trained tokens. A caller may
  give HF's side its own rendering of the samples (tests/test_step_parity.py renders chats by hand), so
  that what our chat templates train on is checked too.
- ours: `train.build_model` (load -> NF4-quantize while streaming -> LoRA) and `train.loss_sum`; HF:
  `LlamaForCausalLM` (SDPA) + `PeftModel.from_pretrained(..., is_trainable=True)`, + bitsandbytes 4-bit for
  QLoRA (nf4, double quant, compute dtype = the run's dtype), loss from `model(..., labels=...)`.
- step 0 runs with LoRA dropout off; the losses must agree within TOL[dtype][0] and the gradients of every
  adapter weight (full mode: of layer 0, the last layer, the final norm, the embeddings and the head) within
  TOL[dtype][1] of their max magnitude; in bf16, measured against HF's fp32 step instead (see `judge`).
"""
import contextlib
import gc
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

R, ALPHA, LR = 16, 32, 2e-4
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Llama-2 shapes; small is Llama-2's architecture at GPT-2-small width (134M parameters, 85M in the layers).
SIZES = {
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden=192, vocab=512),
    "small": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, hidden=2048, vocab=32000),
    "7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, hidden=11008, vocab=32000),
}
# (|loss difference|, gradient error / max |gradient|); fp32: about ten times the largest error measured on a CPU
# (tests/test_step_parity.py's docstring has the figures)
TOL = {"fp32": (2e-5, 2e-5), "bf16": (2e-2, 2e-2)}
# QLoRA: double quantization scales the absmaxes of 256 consecutive 64-value blocks together, and HF's rotary
# row order (checkpoint.permute_for_hf) moves rows of wq/wk between those groups once a weight holds more than
# one group (`qk_groups_split`). Then ours (quantized in Meta's order) and bitsandbytes (in HF's) hold slightly
# different NF4 q/k weights (the other five projections are bit-identical), which moves the loss and every
# gradient downstream; within one group the two hold the same values and TOL applies.
QLORA_TOL = (1e-4, 2e-2)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class ParityError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------
# Shared inputs: checkpoint, adapter, packed batch.


def n_params(s: dict) -> int:
    layer = 2 * s["dim"] * s["dim"] + 2 * s["dim"] * s["dim"] // s["n_heads"] * s["n_kv_heads"] \
        + 3 * s["dim"] * s["hidden"] + 2 * s["dim"]
    return s["n_layers"] * layer + 2 * s["vocab"] * s["dim"] + s["dim"]


def make_inputs(work: Path, size: str, dtype: str, lora_dropout: float) -> Path:
    """HF checkpoint (work/hf) + PEFT adapter (work/adapter), reused when made with the same settings."""
    spec = {"size": SIZES[size], "dtype": dtype, "lora_dropout": lora_dropout, "r": R, "alpha": ALPHA, "seed": 0}
    stamp = work / "inputs.json"
    if stamp.exists() and json.loads(stamp.read_text()) == spec:
        return work
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    s = SIZES[size]
    cfg = LlamaConfig(hidden_size=s["dim"], intermediate_size=s["hidden"], num_hidden_layers=s["n_layers"],
                      num_attention_heads=s["n_heads"], num_key_value_heads=s["n_kv_heads"], vocab_size=s["vocab"],
                      rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[dtype])
    try:
        model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    with torch.no_grad():  # HF initialises norms to 1: random ones make a swapped or missing norm visible
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    work.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(work / "hf")
    peft_model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=lora_dropout,
                                                  target_modules=HF_TARGETS, task_type="CAUSAL_LM"))
    with torch.no_grad():  # B = 0 would make the adapter a no-op and every lora_A gradient zero
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    peft_model.save_pretrained(work / "adapter")
    del model, peft_model
    stamp.write_text(json.dumps(spec))
    return work


def split_of(samples: list[tuple[list[int], list[bool]]]):
    """(ids, mask) samples in memory as a `llama.corpus.Split`, the form the corpus on disk is read in."""
    import numpy as np

    from llama import corpus
    return corpus.Split(ids=np.array([t for ids, _ in samples for t in ids], np.int32),
                        mask=np.array([m for _, mask in samples for m in mask], np.uint8),
                        offsets=np.concatenate(([0], np.cumsum([len(ids) for ids, _ in samples]))).astype(np.int64),
                        targets=np.array([sum(mask[1:]) for _, mask in samples], np.int32))


def pack(samples: list[tuple[list[int], list[bool]]], seq_len: int, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """(ids, mask) samples packed by the product's own code (llama.corpus: the best-fit-decreasing row plan, then
    build_batch), every row at once: tokens/labels/doc_ids [R, seq_len]. Training builds only the rows each
    micro-batch draws, from the corpus on disk; this is the whole-corpus form, from samples in memory."""
    from llama import corpus
    split = split_of(samples)
    rows = corpus.make_rows(split, seq_len)
    batch = corpus.build_batch(split, rows, range(len(rows)), seq_len, pad_id)
    return {k: torch.from_numpy(v) for k, v in batch.items()}


def qk_groups_split(size: str) -> bool:
    """Whether wq (the larger of wq, wk: dim x dim) holds more than one double-quantization group of 256 blocks."""
    return SIZES[size]["dim"] ** 2 > 256 * 64


def synthetic_samples(seq_len: int, rows: int, vocab: int, seed: int = 0) -> list[tuple[list[int], list[bool]]]:
    """Random SFT samples (lengths seq_len/16 .. seq_len/2, the first 30% of each untrained: the prompt) that fill
    `rows` rows of seq_len, first fit in order (a sample that fits no row is left out; 32 such in a row end it)."""
    g = torch.Generator().manual_seed(seed)
    samples, room, misses = [], [seq_len] * rows, 0
    while misses < 32:
        n = int(torch.randint(max(8, seq_len // 16), seq_len // 2 + 1, (), generator=g))
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        r = next((r for r in range(rows) if room[r] >= n), None)
        if r is None:
            misses += 1
            continue
        misses, room[r] = 0, room[r] - n
        n_prompt = int(0.3 * n)
        samples.append((ids, [False] * n_prompt + [True] * (n - n_prompt)))
    return samples


def hf_rows(samples: list[tuple[list[int], list[bool]]], seq_len: int, rows: int, pad_id: int = 0) -> dict:
    """HF's side of a packed batch, from raw (ids, trained mask) samples with nothing of ours: each sample, in
    order, goes into the first of `rows` rows with room (a new row when none has); input_ids, position_ids
    restarting at 0 at each sample (the padded tail counts on from 0 too: one more sequence), and labels in HF's
    convention, labels[i] = ids[i] where token i is trained and -100 elsewhere (HF's loss compares logits[i] with
    labels[i + 1]); a sample's first token is never a target, since nothing of its own comes before it."""
    packed = [[] for _ in range(rows)]
    for ids, mask in samples:
        assert len(ids) == len(mask) <= seq_len, "a sample longer than a row"
        r = next((r for r, row in enumerate(packed) if seq_len - sum(len(i) for i, _ in row) >= len(ids)), None)
        if r is None:
            packed.append([])
        packed[-1 if r is None else r].append((ids, mask))
    input_ids, position_ids, labels = [], [], []
    for row in packed:
        t, p, lab = [], [], []
        for ids, mask in row:
            t += ids
            p += range(len(ids))
            lab += [-100] + [i if m else -100 for i, m in zip(ids[1:], mask[1:])]
        pad = seq_len - len(t)
        input_ids.append(t + [pad_id] * pad)
        position_ids.append(p + list(range(pad)))
        labels.append(lab + [-100] * pad)
    return {"hf_tokens": torch.tensor(input_ids), "position_ids": torch.tensor(position_ids),
            "hf_labels": torch.tensor(labels)}


def make_batch(path: Path, seq_len: int, tokens_per_step: int, vocab: int, seed: int = 0, samples=None,
               hf_samples=None) -> dict:
    """The step's batch (saved to path): ours, tokens/labels/doc_ids from `pack`, and HF's,
    hf_tokens/position_ids/hf_labels from `hf_rows`. `samples`: (ids, trained mask) pairs, by default synthetic
    ones filling tokens_per_step // seq_len rows; `hf_samples`: HF's rendering of the same samples (default:
    the same pairs)."""
    if samples is None:
        samples = synthetic_samples(seq_len, max(1, tokens_per_step // seq_len), vocab, seed)
    ours = pack(samples, seq_len, pad_id=0)
    batch = dict(ours, **hf_rows(samples if hf_samples is None else hf_samples, seq_len, len(ours["tokens"])))
    torch.save(batch, path)
    return batch


def side_spec(work: Path, batch_file: Path, impl: str, mode: str, size: str, device: str, dtype: str,
              lora_dropout: float, **extra) -> dict:
    """What build_ours / build_hf need to know (JSON-able: bench_train sends it to a child process)."""
    return dict(impl=impl, mode=mode, size=size, device=device, dtype=dtype, hf=str(work / "hf"),
                adapter=str(work / "adapter"), batch=str(batch_file), lora_dropout=lora_dropout, **extra)


# ---------------------------------------------------------------------------------------------
# The two sides. Each build returns (model, trainable params, AdamW, loss_fn, set_dropout, grads).


def build_ours(spec: dict, device: torch.device, dtype: torch.dtype):
    import lora
    import train

    mode = spec["mode"].split("+")[0]
    cfg = train.TrainConfig(ckpt=spec["hf"], quant="nf4" if mode == "qlora" else "none", full=mode == "full",
                            lora_r=R, lora_alpha=ALPHA, lora_dropout=spec["lora_dropout"],
                            grad_checkpointing=spec["mode"].endswith("+gc"), device=str(device),
                            init_adapter="" if mode == "full" else spec["adapter"], lr=LR)
    model, _ = train.build_model(cfg, device, dtype)
    if spec.get("perturb"):  # tests: a different computation must be caught by the parity check
        with torch.no_grad():
            model.norm.weight.mul_(1 + spec["perturb"])
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = train.make_optimizer(cfg, params, device)
    b = {k: v.to(device) for k, v in torch.load(spec["batch"]).items()}
    n_target = int((b["labels"] != -100).sum())

    def loss_fn():
        with train.autocast(device, dtype):  # train.py's precision rule (no autocast on CPU), whatever the caller's
            return train.loss_sum(model, b["tokens"], b["labels"], b["doc_ids"]) / n_target

    def set_dropout(p: float) -> None:
        for m in model.modules():
            if isinstance(m, lora.LoRALinear):
                m.dropout = p

    return model, params, opt, loss_fn, set_dropout, ours_grads


def ours_grads(model) -> dict[str, torch.Tensor]:
    """Gradients under HF names, q/k rows in HF's rotary order, as the baseline's."""
    import lora
    from llama.checkpoint import meta_to_hf_key, permute_for_hf, rotary_heads

    args, out = model.args, {}
    for name, m in model.named_modules():
        if isinstance(m, lora.LoRALinear):
            hf, heads = meta_to_hf_key(name), rotary_heads(args, name)
            gB = m.lora_B.grad
            out[hf + ".lora_A"] = m.lora_A.grad
            out[hf + ".lora_B"] = permute_for_hf(gB, heads) if heads else gB
    if not out:  # full fine-tuning: a subset, enough to check the whole chain
        for name, p in model.named_parameters():
            if _full_subset(name, args.n_layers):
                heads = rotary_heads(args, name)
                out[meta_to_hf_key(name)] = permute_for_hf(p.grad, heads) if heads else p.grad
    return out


def _full_subset(meta_name: str, n_layers: int) -> bool:
    return meta_name.startswith(("layers.0.", f"layers.{n_layers - 1}.", "norm.", "tok_embeddings.", "output."))


def build_hf(spec: dict, device: torch.device, dtype: torch.dtype):
    from peft import PeftModel
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    mode = spec["mode"].split("+")[0]
    kw = {}
    if mode == "qlora":
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    model = LlamaForCausalLM.from_pretrained(spec["hf"], dtype=dtype, attn_implementation="sdpa",
                                             device_map=str(device), **kw)
    model.config.use_cache = False
    if spec.get("perturb_hf"):
        with torch.no_grad():
            model.model.norm.weight.mul_(1 + spec["perturb_hf"])
    if spec["mode"].endswith("+gc"):  # what the Trainer does for gradient_checkpointing=True (non-reentrant)
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    if mode != "full":
        model = PeftModel.from_pretrained(model, spec["adapter"], is_trainable=True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                            fused=device.type == "cuda")  # = train.make_optimizer's defaults
    b = {k: v.to(device) for k, v in torch.load(spec["batch"]).items()}
    n_layers = SIZES[spec["size"]]["n_layers"]

    def loss_fn():
        return model(input_ids=b["hf_tokens"], position_ids=b["position_ids"], labels=b["hf_labels"],
                     use_cache=False).loss

    def set_dropout(p: float) -> None:
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Dropout) and "lora_dropout" in name:
                m.p = p

    def grads(model) -> dict[str, torch.Tensor]:
        out = {}
        for name, p in model.named_parameters():
            if p.grad is None:
                continue
            name = name.removeprefix("base_model.model.").replace(".default.weight", "")
            if mode == "full":
                name = name.removesuffix(".weight")
                meta_like = name.replace("model.layers.", "layers.").replace("model.norm", "norm.") \
                    .replace("model.embed_tokens", "tok_embeddings.").replace("lm_head", "output.")
                if not _full_subset(meta_like, n_layers):
                    continue
                name += ".weight"
            out[name] = p.grad
        return out

    return model, params, opt, loss_fn, set_dropout, grads


def autocast(device: torch.device, dtype: torch.dtype):
    """16-bit runs: 16-bit weights under autocast, as the HF Trainer (bf16=True) runs (ours: `train.autocast`
    inside its loss_fn, autocast on CUDA only); fp32: off."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def saved_grads(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gradients as compared: fp32, contiguous, on the CPU."""
    return {k: v.detach().float().contiguous().cpu() for k, v in grads.items()}


# ---------------------------------------------------------------------------------------------
# Comparison.


def compare_grads(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per tensor: max|a - b| / max|b| (NaN if either is not finite)."""
    if set(a) != set(b):
        raise ParityError(f"gradients of different tensors: only ours {sorted(set(a) - set(b))[:4]}, "
                          f"only HF {sorted(set(b) - set(a))[:4]}")
    return {k: ((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)).item() for k in sorted(a)}


def worst(errs: dict[str, float]) -> tuple[float, str]:
    """The largest error and its tensor; NaN counts as the worst."""
    bad = [(k, e) for k, e in errs.items() if not e <= 1e30]
    k, e = bad[0] if bad else max(errs.items(), key=lambda kv: kv[1], default=("-", 0.0))
    return e, k


def judge(mode: str, dtype: str, loss: dict[str, float], grads: dict[str, dict[str, torch.Tensor]],
          size: str | None = None) -> tuple[dict, list[str]]:
    """Step 0 of both sides against the tolerances: (figures for the record, what failed: empty if nothing).
    QLoRA is held to QLORA_TOL where the q/k weights of `size` span several double-quant groups (or size unknown).

    `loss` and `grads` hold "ours" and "hf", and for a 16-bit dtype "ref": HF's step in fp32 on the same weights.
    fp32: ours must match HF within TOL. 16-bit: each stack rounds differently, and how far that moves a
    gradient depends on the model, so ours is judged against the fp32 reference: within the tolerance of it, or
    no further from it than twice HF's own 16-bit step is (per tensor, and for the loss)."""
    tol_loss, tol_grad = TOL[dtype]
    if mode.startswith("qlora") and (size is None or qk_groups_split(size)):
        tol_loss, tol_grad = max(tol_loss, QLORA_TOL[0]), max(tol_grad, QLORA_TOL[1])
    errs = compare_grads(grads["ours"], grads["hf"])
    err, where = worst(errs)
    row = {"loss0_ours": loss["ours"], "loss0_hf": loss["hf"], "loss0_diff": abs(loss["ours"] - loss["hf"]),
           "grad_rel_err": err, "grad_worst": where, "n_grads": len(errs), "tol_loss": tol_loss, "tol_grad": tol_grad}
    failed = []
    if "ref" not in loss:
        if not row["loss0_diff"] <= tol_loss:
            failed.append(f"step-0 loss ours {loss['ours']:.6f} vs HF {loss['hf']:.6f} (|diff| {row['loss0_diff']:.2e} "
                          f"> {tol_loss:g})")
        if not err <= tol_grad:
            failed.append(f"gradient of {where} differs by {err:.2e} of its max (> {tol_grad:g})")
        return row, failed
    ours_err, hf_err = compare_grads(grads["ours"], grads["ref"]), compare_grads(grads["hf"], grads["ref"])
    d_ours, d_hf = abs(loss["ours"] - loss["ref"]), abs(loss["hf"] - loss["ref"])
    row.update(loss0_ref=loss["ref"], ours_vs_ref=worst(ours_err), hf_vs_ref=worst(hf_err))
    if not d_ours <= max(tol_loss, 2 * d_hf):
        failed.append(f"step-0 loss ours {loss['ours']:.6f}, HF {loss['hf']:.6f}, HF fp32 {loss['ref']:.6f}: ours is "
                      f"{d_ours:.2e} from fp32 (> {tol_loss:g} and > twice HF's {d_hf:.2e})")
    for k, e in ours_err.items():
        if not e <= max(tol_grad, 2 * hf_err[k]):
            failed.append(f"gradient of {k}: ours is {e:.2e} of its max from HF's fp32 step (> {tol_grad:g} and "
                          f"> twice HF's {dtype} step, {hf_err[k]:.2e})")
    return row, failed


def step0(spec: dict, device: torch.device, dtype: torch.dtype) -> tuple[float, dict[str, torch.Tensor]]:
    """Build one side in this process and run step 0 (forward + backward, LoRA dropout off): the loss and the
    gradients (saved_grads). The model is freed before returning."""
    torch.manual_seed(0)
    build = build_hf if spec["impl"] == "hf" else build_ours
    model, _, _, loss_fn, set_dropout, grads = build(spec, device, dtype)
    set_dropout(0.0)
    with autocast(device, dtype):
        loss = loss_fn()
    loss.backward()
    out = loss.item(), saved_grads(grads(model))
    del model, loss_fn, set_dropout, grads, loss
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def step0_parity(work: Path, mode: str, size: str, device: str, dtype: str, seq_len: int, tokens_per_step: int,
                 lora_dropout: float = 0.05, samples=None, hf_samples=None) -> dict:
    """Both sides' step 0 in this process, one after the other (and HF's in fp32 as the reference for a 16-bit
    dtype), judged: the figures plus "failures" (a list, empty when the two compute the same step). `samples`,
    `hf_samples`: see make_batch."""
    make_inputs(work, size, dtype, lora_dropout)
    batch_file = work / f"batch_{seq_len}_{tokens_per_step}.pt"
    make_batch(batch_file, seq_len, tokens_per_step, SIZES[size]["vocab"], samples=samples, hf_samples=hf_samples)
    loss, grads = {}, {}
    for name, impl, dt in runs(dtype):
        spec = side_spec(work, batch_file, impl, mode, size, device, dt, lora_dropout)
        loss[name], grads[name] = step0(spec, torch.device(device), DTYPES[dt])
    row, failed = judge(mode, dtype, loss, grads, size)
    return dict(row, failures=failed)


def runs(dtype: str) -> list[tuple[str, str, str]]:
    """(name, impl, dtype) of the step-0 runs `judge` needs."""
    return [("ours", "ours", dtype), ("hf", "hf", dtype)] + ([("ref", "hf", "fp32")] if dtype != "fp32" else [])
