"""One training step, ours vs the Hugging Face stack, on the same weights, batch, adapter and optimizer.

    python benchmarks/bench_train.py --size small                          # CPU, ~15-25 min on 2 cores
    python benchmarks/bench_train.py --size 7b --device cuda
    python benchmarks/bench_train.py --size tiny --seq-len 128 --modes lora  # seconds

A step is forward, backward, gradient clipping (0.3) and AdamW (lr 2e-4, the same torch.optim.AdamW
construction on both sides), on one packed batch of --tokens-per-step tokens (rows of --seq-len):

- ours:     `train.build_model` (load -> NF4-quantize while streaming -> LoRA), `train.loss_sum`
            (the head on trained tokens only, cross-entropy gradient taken in the forward) and
            `train.make_optimizer`: the product's own step.
- baseline: `transformers.LlamaForCausalLM` (SDPA attention) + `peft` LoRA loaded with
            `PeftModel.from_pretrained(..., is_trainable=True)`, + bitsandbytes 4-bit for QLoRA
            (`BitsAndBytesConfig`: nf4, double quant, compute dtype = the run's dtype), loss from
            `model(..., labels=...)`, gradient checkpointing by `gradient_checkpointing_enable()`
            (non-reentrant). This is what TRL's SFTTrainer runs, except that we do not call peft's
            `prepare_model_for_kbit_training`, which upcasts the 16-bit weights to fp32 (a no-op in an fp32
            run; on CUDA it would compare different precisions).

Modes: full, lora, qlora, each without and with gradient checkpointing (`+gc`). LoRA: r 16, alpha 32,
all seven projections, --lora-dropout (default 0.05, the QLoRA recipe's). Precision: fp32 on CPU; bf16
weights under bf16 autocast on CUDA (as train.py and the HF Trainer with bf16=True).

Same computation on both sides, checked before anything is timed:
- weights: a random `LlamaConfig` model (norm weights randomised too) saved with `save_pretrained`; ours
  loads that folder with `llama.load_model`. The adapter (random B, so the LoRA path is not a no-op) is
  written by peft's `save_pretrained` and loaded by both.
- packed batch: `train.pack` rows with document ids. Ours takes `doc_ids`; HF gets `position_ids` that
  restart at 0 at each document and no attention_mask, from which transformers builds the same
  block-diagonal causal mask (`masking_utils.find_packed_sequence_indices`: TRL's padding-free packing).
  Labels: ours are already shifted (label[i] = token[i+1]); HF shifts inside its loss, so it gets them
  moved one place right. Both losses are the mean over the same trained tokens.
- step 0 runs with LoRA dropout switched off; the losses must agree within 1e-4 (fp32) and the
  gradients of every adapter weight (full mode: of layer 0, the last layer, the final norm, the
  embeddings and the head) within 1e-3 of their max magnitude, else the run stops: a speed comparison of
  different computations is worthless. bf16 runs use 2e-2 for both, and so do QLoRA's gradients:
  double quantization is not invariant under HF's rotary row order, so the two stacks hold slightly
  different NF4 q/k weights (see QLORA_GRAD_TOL).

Timing and memory: every configuration runs in its own fresh process (ours and HF side by side, one
pair per mode and seq-len); the parent asks them for steps alternately (ours, HF, HF, ours, ...) so
drifting machine load hits both alike, and reports tokens/s = tokens per step / median step time after
warm-up. Peak memory: CUDA, torch.cuda.max_memory_allocated over the timed steps; CPU, the process's
peak RSS (VmHWM) over the timed steps, reset after step 0 (the optimizer state exists by then) once
freed heap pages have been returned (malloc_trim), so the figure is the steady training peak, not the
load. "above imports" subtracts the RSS the process had after its imports (train.py's for ours; torch +
transformers + peft + bitsandbytes for HF). /proc/loadavg is recorded around each pair. Both processes get
train.py's process settings (`train.PROCESS_ENV`: MKL's strict reproducibility and c10's transparent huge
pages for CPU tensors), so the baseline gets the same allocator; set THP_MEM_ALLOC_ENABLE=0 to run both without.

Output: a markdown table on stdout, results/bench_train_<size>_<device>.json, and a PNG bar chart when
matplotlib is installed.
"""
import argparse
import ctypes
import datetime
import gc
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

R, ALPHA, CLIP, LR = 16, 32, 0.3, 2e-4
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODES = ("full", "full+gc", "lora", "lora+gc", "qlora", "qlora+gc")
# Llama-2 shapes; small is Llama-2's architecture at GPT-2-small width (134M parameters, 85M in the layers).
SIZES = {
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden=192, vocab=512),
    "small": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, hidden=2048, vocab=32000),
    "7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, hidden=11008, vocab=32000),
}
TOL = {"fp32": (1e-4, 1e-3), "bf16": (2e-2, 2e-2)}  # (|loss difference|, gradient error / max |gradient|)
# QLoRA: double quantization scales the absmaxes of 256 consecutive 64-value blocks together, and HF's rotary
# row order (checkpoint.permute_for_hf) moves rows of wq/wk between those groups. So ours (quantized in Meta's
# order) and bitsandbytes (in HF's) hold slightly different NF4 q/k weights (~0.5% of max |w| in most values;
# the other five projections are bit-identical), which moves every gradient downstream by up to ~0.5%.
QLORA_GRAD_TOL = 2e-2
MARK = "@@bench "  # replies from a child start with this; anything else on its stdout is library chatter


class ParityError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------
# Shared inputs: checkpoint, adapter, packed batch (made once by the parent, read by every child).


def n_params(s: dict) -> int:
    layer = 2 * s["dim"] * s["dim"] + 2 * s["dim"] * s["dim"] // s["n_heads"] * s["n_kv_heads"] \
        + 3 * s["dim"] * s["hidden"] + 2 * s["dim"]
    return s["n_layers"] * layer + 2 * s["vocab"] * s["dim"] + s["dim"]


def make_inputs(work: Path, size: str, dtype: str, lora_dropout: float) -> Path:
    """HF checkpoint + PEFT adapter in work/ (reused when they were made with the same settings)."""
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
    torch.set_default_dtype(torch.bfloat16 if dtype == "bf16" else torch.float32)
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


def make_batch(path: Path, seq_len: int, tokens_per_step: int, vocab: int, seed: int = 0) -> dict:
    """Synthetic SFT samples (lengths seq_len/16 .. seq_len/2, the first 30% of each untrained: the
    prompt) packed by train.pack; the first tokens_per_step // seq_len rows form the batch."""
    import train

    rows = max(1, tokens_per_step // seq_len)
    g = torch.Generator().manual_seed(seed)
    samples, total = [], 0
    while total < 1.1 * rows * seq_len:
        n = int(torch.randint(max(8, seq_len // 16), seq_len // 2 + 1, (), generator=g))
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        n_prompt = int(0.3 * n)
        samples.append((ids, [False] * n_prompt + [True] * (n - n_prompt)))
        total += n
    packed = {k: v[:rows] for k, v in train.pack(samples, seq_len, pad_id=0).items()}
    # HF: positions restart at every document (the padding tail included, as ours does) ...
    pos = torch.zeros_like(packed["doc_ids"])
    for r in range(rows):
        for t in range(1, seq_len):
            same = packed["doc_ids"][r, t] == packed["doc_ids"][r, t - 1]
            pos[r, t] = pos[r, t - 1] + 1 if same else 0
    # ... and labels one place to the right: HF's loss compares logits[i] with labels[i + 1]
    assert (packed["labels"][:, -1] == -100).all(), "a row's last label must be untrained (it ends a document)"
    hf_labels = torch.full_like(packed["labels"], -100)
    hf_labels[:, 1:] = packed["labels"][:, :-1]
    batch = dict(packed, position_ids=pos, hf_labels=hf_labels)
    torch.save(batch, path)
    return batch


# ---------------------------------------------------------------------------------------------
# The children: one configuration each, driven over stdin/stdout.


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap pages back, so RSS is what is in use
    except OSError:  # not glibc
        pass


def build_ours(spec: dict, device: torch.device, dtype: torch.dtype):
    import lora
    import train

    mode = spec["mode"].split("+")[0]
    cfg = train.TrainConfig(ckpt=spec["hf"], quant="nf4" if mode == "qlora" else "none", full=mode == "full",
                            lora_r=R, lora_alpha=ALPHA, lora_dropout=spec["lora_dropout"],
                            grad_checkpointing=spec["mode"].endswith("+gc"), device=str(device),
                            init_adapter="" if mode == "full" else spec["adapter"], lr=LR)
    model, _ = train.build_model(cfg, None, [], device, dtype)
    if spec.get("perturb"):  # tests: a different computation must be caught by the parity check
        with torch.no_grad():
            model.norm.weight.mul_(1 + spec["perturb"])
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = train.make_optimizer(cfg, params, device)
    b = {k: v.to(device) for k, v in torch.load(spec["batch"]).items()}
    n_target = int((b["labels"] != -100).sum())

    def loss_fn():
        return train.loss_sum(model, b["tokens"], b["labels"], b["doc_ids"]) / n_target

    def set_dropout(p: float) -> None:
        for m in model.modules():
            if isinstance(m, lora.LoRALinear):
                m.dropout = p

    return model, params, opt, loss_fn, set_dropout, ours_grads


def ours_grads(model) -> dict[str, torch.Tensor]:
    """Gradients under HF names, q/k rows in HF's rotary order, as the baseline's."""
    import lora
    from llama.checkpoint import meta_to_hf_key, permute_for_hf

    args, out = model.args, {}
    heads = {"wq": args.n_heads, "wk": args.n_kv_heads or args.n_heads}
    for name, m in model.named_modules():
        if isinstance(m, lora.LoRALinear):
            leaf, hf = name.rsplit(".", 1)[-1], meta_to_hf_key(name)
            gB = m.lora_B.grad
            out[hf + ".lora_A"] = m.lora_A.grad
            out[hf + ".lora_B"] = permute_for_hf(gB, heads[leaf]) if leaf in heads else gB
    if not out:  # full fine-tuning: a subset, enough to check the whole chain
        for name, p in model.named_parameters():
            if _full_subset(name, args.n_layers):
                leaf = name.rsplit(".", 2)[-2]
                out[meta_to_hf_key(name)] = permute_for_hf(p.grad, heads[leaf]) if leaf in heads else p.grad
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
        return model(input_ids=b["tokens"], position_ids=b["position_ids"], labels=b["hf_labels"],
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


def child(spec: dict) -> None:
    def reply(**kw):
        print(MARK + json.dumps(kw), flush=True)

    device = torch.device(spec["device"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
    torch.manual_seed(0)
    if spec["impl"] == "hf":  # the baseline's imports count towards its process, as they would in a real run
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
        import transformers  # noqa: F401
    else:
        import train  # noqa: F401
    _trim()
    rss_imports = _status_kib("VmRSS") * 1024
    t0 = time.perf_counter()
    build = build_hf if spec["impl"] == "hf" else build_ours
    model, params, opt, loss_fn, set_dropout, grads = build(spec, device, dtype)
    autocast = torch.autocast("cuda", dtype=dtype) if device.type == "cuda" and dtype != torch.float32 \
        else torch.autocast(device.type, enabled=False)
    reply(ready=True, setup_s=time.perf_counter() - t0, rss_imports=rss_imports,
          trainable=sum(p.numel() for p in params), env={k: os.environ.get(k) for k in process_env()})

    def step(dump: str | None = None) -> dict:
        sync()
        t, cpu = time.perf_counter(), time.process_time()
        with autocast:
            loss = loss_fn()
        loss.backward()
        if dump:
            from safetensors.torch import save_file
            save_file({k: v.detach().float().contiguous().cpu() for k, v in grads(model).items()}, dump)
        gnorm = torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        out = {"loss": loss.item(), "grad_norm": float(gnorm)}  # .item(): the step is done when its loss is read
        sync()
        out["time"], out["cpu"] = time.perf_counter() - t, time.process_time() - cpu
        return out

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["op"] == "step0":
                set_dropout(0.0)
                r = step(cmd["dump"])
                set_dropout(spec["lora_dropout"])
                _trim()  # then measure the steady state: the optimizer state exists from here on
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                else:
                    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
                reply(rss_after_step0=_status_kib("VmRSS") * 1024, **r)
            elif cmd["op"] == "step":
                reply(**step())
            elif cmd["op"] == "mem":
                if device.type == "cuda":
                    reply(peak=torch.cuda.max_memory_allocated(), reserved=torch.cuda.max_memory_reserved())
                else:
                    reply(peak=_status_kib("VmHWM") * 1024)
            elif cmd["op"] == "quit":
                return
        except torch.OutOfMemoryError as e:
            reply(error=f"out of memory: {str(e).splitlines()[0]}")
            return


def process_env() -> dict[str, str]:
    """train.py's process settings (MKL_CBWR, THP_MEM_ALLOC_ENABLE), given to both sides alike: the HF
    baseline gets the same allocator, so the ratios measure the code. A value set in this environment wins
    (THP_MEM_ALLOC_ENABLE=0 measures both without huge pages)."""
    from train import PROCESS_ENV
    return {k: os.environ.get(k, v) for k, v in PROCESS_ENV.items()}


class Child:
    """A configuration's process: JSON commands in, JSON replies out; stderr goes to a log file."""

    def __init__(self, spec: dict, log: Path):
        self.log = log
        self.proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, cwd=ROOT,
                                     env={**os.environ, **process_env()})

    def ask(self, op: str, **kw) -> dict:
        self.proc.stdin.write(json.dumps(dict(op=op, **kw)) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        self.proc.wait()
        tail = "".join(self.log.read_text().splitlines(True)[-15:])
        return {"error": f"process exited with {self.proc.returncode}:\n{tail}"}

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---------------------------------------------------------------------------------------------
# The parent: parity, alternating timing, the table.


def compare_grads(a_file: str, b_file: str) -> dict[str, float]:
    """Per tensor: max|a - b| / max|b| (NaN if either is not finite)."""
    from safetensors.torch import load_file

    a, b = load_file(a_file), load_file(b_file)
    if set(a) != set(b):
        raise ParityError(f"gradients of different tensors: only ours {sorted(set(a) - set(b))[:4]}, "
                          f"only HF {sorted(set(b) - set(a))[:4]}")
    return {k: ((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)).item() for k in sorted(a)}


def worst(errs: dict[str, float]) -> tuple[float, str]:
    """The largest error and its tensor; NaN counts as the worst."""
    bad = [(k, e) for k, e in errs.items() if not e <= 1e30]
    k, e = bad[0] if bad else max(errs.items(), key=lambda kv: kv[1], default=("-", 0.0))
    return e, k


def run_pair(mode: str, seq_len: int, args, work: Path, batch_file: Path, tokens: int) -> dict:
    base = dict(mode=mode, seq_len=seq_len, size=args.size, device=args.device, dtype=args.dtype,
                hf=str(work / "hf"), adapter=str(work / "adapter"), batch=str(batch_file),
                lora_dropout=args.lora_dropout)
    row = {"mode": mode, "seq_len": seq_len, "tokens_per_step": tokens, "loadavg_before": loadavg()}
    children = {}
    try:
        for impl in ("ours", "hf"):
            spec = dict(base, impl=impl, perturb=args.perturb_ours if impl == "ours" else 0.0)
            children[impl] = Child(spec, work / f"log_{impl}_{mode}_{seq_len}.txt")
        for impl, c in children.items():  # both load at once; nothing is timed yet
            r = c.read()
            if "error" in r:
                raise RuntimeError(f"{impl} {mode} failed to start: {r['error']}")
            row[f"{impl}_setup_s"], row[f"{impl}_rss_imports"] = r["setup_s"], r["rss_imports"]
            row[f"{impl}_trainable"], row[f"{impl}_env"] = r["trainable"], r["env"]
        # ---- step 0: the same computation, or stop
        step0 = {}
        for impl, c in children.items():
            step0[impl] = c.ask("step0", dump=str(work / f"grads_{impl}.safetensors"))
            if "error" in step0[impl]:
                return dict(row, error=f"{impl}: {step0[impl]['error']}")
        tol_loss, tol_grad = TOL[args.dtype]
        row["loss0_ours"], row["loss0_hf"] = step0["ours"]["loss"], step0["hf"]["loss"]
        row["loss0_diff"] = abs(row["loss0_ours"] - row["loss0_hf"])
        errs = compare_grads(str(work / "grads_ours.safetensors"), str(work / "grads_hf.safetensors"))
        row["grad_rel_err"], where = worst(errs)
        if mode.startswith("qlora"):
            tol_grad = max(tol_grad, QLORA_GRAD_TOL)
        failed = [f"step-0 loss ours {row['loss0_ours']:.6f} vs HF {row['loss0_hf']:.6f} (|diff| "
                  f"{row['loss0_diff']:.2e} > {tol_loss:g})"] if not row["loss0_diff"] <= tol_loss else []
        if not row["grad_rel_err"] <= tol_grad:
            failed.append(f"gradient of {where} differs by {row['grad_rel_err']:.2e} of its max (> {tol_grad:g})")
        if failed:
            raise ParityError(f"{mode} seq {seq_len}: " + "; ".join(failed)
                              + ". The two sides do not compute the same step; nothing was timed.")
        # ---- alternate: ours, hf | hf, ours | ... so drift in load hits both alike
        times, cpu = {"ours": [], "hf": []}, {"ours": [], "hf": []}
        for i in range(args.warmup + args.reps):
            for impl in (("ours", "hf") if i % 2 == 0 else ("hf", "ours")):
                r = children[impl].ask("step")
                if "error" in r:
                    return dict(row, error=f"{impl}: {r['error']}")
                if i >= args.warmup:
                    times[impl].append(r["time"])
                    cpu[impl].append(r["cpu"])
        for impl, c in children.items():
            m = c.ask("mem")
            row[f"{impl}_step_s"] = statistics.median(times[impl])
            row[f"{impl}_step_times"] = times[impl]
            row[f"{impl}_step_cpu_s"] = cpu[impl]  # process CPU time per step: less sensitive to other load
            row[f"{impl}_tok_s"] = tokens / row[f"{impl}_step_s"]
            row[f"{impl}_peak"] = m["peak"]
            if args.device == "cpu":
                row[f"{impl}_peak_above_imports"] = m["peak"] - row[f"{impl}_rss_imports"]
        row["speed_ratio"] = row["ours_tok_s"] / row["hf_tok_s"]
        row["speed_ratio_best_step"] = min(times["hf"]) / min(times["ours"])
        row["cpu_time_ratio"] = statistics.median(cpu["hf"]) / statistics.median(cpu["ours"])
        row["mem_ratio"] = row["ours_peak"] / row["hf_peak"]
        if args.device == "cpu":
            row["mem_ratio_above_imports"] = row["ours_peak_above_imports"] / row["hf_peak_above_imports"]
    finally:
        for c in children.values():
            c.close()
    row["loadavg_after"] = loadavg()
    return row


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def git_commit() -> str:
    """The code measured: HEAD, with '+dirty' when tracked files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    for line in Path("/proc/cpuinfo").read_text().splitlines() if os.path.exists("/proc/cpuinfo") else []:
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    return "cpu"


def table(result: dict) -> str:
    mib = lambda b: f"{b / 2**20:,.0f}"  # noqa: E731
    cpu = result["device"] == "cpu"
    lines = [f"**{result['size']}** ({result['params'] / 1e6:.1f}M params), {result['device_name']}, "
             f"{result['dtype']}, torch {result['torch']}, {result['date']}; {result['tokens_per_step']} tokens/step, "
             f"median of {result['reps']} steps after {result['warmup'] + 1} warm-up; LoRA r {R}, alpha {ALPHA}, "
             f"dropout {result['lora_dropout']}, 7 projections; peak = "
             + ("peak RSS of the process during the timed steps" if cpu else "torch.cuda.max_memory_allocated")
             + "; both sides run with " + " ".join(f"{k}={v}" for k, v in result.get("process_env", {}).items()), "",
             "| seq | mode | ours tok/s | HF tok/s | speed ours/HF | ours peak MiB | HF peak MiB | mem ours/HF |"
             + (" mem ours/HF above imports |" if cpu else "") + " step-0 \\|Δloss\\| | grad err | load avg |",
             "|---:|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if cpu else "") + "---:|---:|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['seq_len']} | {r['mode']} | {r['error'].splitlines()[0]} |")
            continue
        lines.append(f"| {r['seq_len']} | {r['mode']} | {r['ours_tok_s']:,.0f} | {r['hf_tok_s']:,.0f} | "
                     f"**{r['speed_ratio']:.2f}x** | {mib(r['ours_peak'])} | {mib(r['hf_peak'])} | "
                     f"**{r['mem_ratio']:.2f}x** |" + (f" {r['mem_ratio_above_imports']:.2f}x |" if cpu else "")
                     + f" {r['loss0_diff']:.1e} | {r['grad_rel_err']:.1e}"
                     + f" | {r['loadavg_before']} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in result["rows"] if "error" not in r]
    seqs = sorted({r["seq_len"] for r in rows})
    if not rows:
        return False
    fig, axes = plt.subplots(2, len(seqs), figsize=(6 * len(seqs), 7), squeeze=False)
    for j, seq in enumerate(seqs):
        rs = [r for r in rows if r["seq_len"] == seq]
        x = range(len(rs))
        for i, (key, scale, label) in enumerate((("tok_s", 1, "tokens/s"), ("peak", 2**-20, "peak MiB"))):
            ax = axes[i][j]
            ax.bar([v - 0.2 for v in x], [r[f"ours_{key}"] * scale for r in rs], 0.4, label="ours")
            ax.bar([v + 0.2 for v in x], [r[f"hf_{key}"] * scale for r in rs], 0.4, label="transformers+peft+bnb")
            ax.set_xticks(list(x), [r["mode"] for r in rs])
            ax.set_ylabel(label)
            ax.set_title(f"{result['size']}, seq {seq}: {label}")
            ax.legend(fontsize=8)
    fig.suptitle(f"One training step, {result['device_name']}, {result['dtype']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="small", choices=list(SIZES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--seq-len", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--tokens-per-step", type=int, default=2048, help="rows per step = this // seq-len (at least 1)")
    ap.add_argument("--reps", type=int, default=None, help="timed steps per side (default 6 on cpu: shared CPUs are noisy, 10 on cuda)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps after step 0")
    ap.add_argument("--lora-dropout", type=float, default=0.05)
    ap.add_argument("--work-dir", default=None, help="checkpoint, adapter, batches, logs (default: a temp folder, reused)")
    ap.add_argument("--out-dir", default=str(ROOT / "results"))
    ap.add_argument("--perturb-ours", type=float, default=0.0, help=argparse.SUPPRESS)  # tests only
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return {}
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    args.dtype = "bf16" if args.device == "cuda" else "fp32"
    args.reps = args.reps or (10 if args.device == "cuda" else 6)
    for s in args.seq_len:
        if s < 16 or s > 4096:
            raise SystemExit(f"--seq-len {s}: expected 16..4096 (the checkpoint's max_position_embeddings)")

    work = Path(args.work_dir or Path(tempfile.gettempdir()) / f"bench_train_{args.size}_{args.dtype}")
    t0 = time.time()
    make_inputs(work, args.size, args.dtype, args.lora_dropout)
    print(f"inputs in {work} ({time.time() - t0:.0f}s); load avg {loadavg()}", file=sys.stderr, flush=True)
    result = {"size": args.size, "params": n_params(SIZES[args.size]), "shape": SIZES[args.size],
              "device": args.device, "device_name": device_name(args.device), "dtype": args.dtype,
              "torch": torch.__version__.split("+")[0], "date": datetime.date.today().isoformat(),
              "tokens_per_step": args.tokens_per_step, "reps": args.reps, "warmup": args.warmup,
              "lora_dropout": args.lora_dropout, "r": R, "alpha": ALPHA, "rows": []}
    result["commit"] = git_commit()
    result["process_env"] = process_env()
    result["versions"] = {}
    for pkg in ("transformers", "peft", "bitsandbytes"):
        try:
            result["versions"][pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    for seq_len in args.seq_len:
        batch_file = work / f"batch_{seq_len}_{args.tokens_per_step}.pt"
        batch = make_batch(batch_file, seq_len, args.tokens_per_step, SIZES[args.size]["vocab"])
        tokens = batch["tokens"].numel()
        for mode in args.modes:
            t = time.time()
            row = run_pair(mode, seq_len, args, work, batch_file, tokens)
            row["trained_tokens"] = int((batch["labels"] != -100).sum())
            result["rows"].append(row)
            brief = row.get("error") or (f"ours {row['ours_tok_s']:.0f} tok/s vs HF {row['hf_tok_s']:.0f} "
                                         f"({row['speed_ratio']:.2f}x), peak {row['mem_ratio']:.2f}x, "
                                         f"loss0 diff {row['loss0_diff']:.1e}")
            print(f"seq {seq_len} {mode}: {brief} [{time.time() - t:.0f}s, load {row['loadavg_before']}]",
                  file=sys.stderr, flush=True)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"bench_train_{args.size}_{args.device}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"\nwrote {stem.with_suffix('.json')}" + (f" and {stem.with_suffix('.png')}" if plot(result, stem.with_suffix(".png")) else ""))
    return result


if __name__ == "__main__":
    try:
        main()
    except ParityError as e:
        raise SystemExit(f"parity check failed: {e}")
