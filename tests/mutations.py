"""Planted bugs: each is a small edit that would silently break what users get (a scale, a mask bit, a
permutation, a dropped state), and the fast tests named beside it must fail on it.

For every bug the harness copies the product (the files git lists, tracked or new, as they are in the working
tree) to a temporary folder, applies the edit there, and runs
    python -m pytest -x -q -m "not slow" -p no:cacheprovider <tests>
in that copy with PYTHONPATH set to it. Outcomes: caught (pytest exits 1: a test failed), survived (exit 0:
every test passed with the bug in), error (anything else: a selection that collects no test, a timeout, ...).
Each edit's `old` text must occur exactly once in its file: when a refactor moves the code, the harness fails
saying the patch no longer applies, so the list is kept current with the product.

    python tests/mutations.py               # every bug; exits 1 if any survives, errs or no longer applies
    python tests/mutations.py --list        # the bugs and their tests
    python tests/mutations.py --only NAME   # one bug (repeatable)
    python tests/mutations.py --clean       # each selection on the unpatched copy: it must pass (exit 0)

Not a test module (pytest collects test_*.py only): CI runs it after the suite, which must pass first, since
a selection that fails without any bug would count as a catch.
"""
import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent


class Bug(NamedTuple):
    name: str
    file: str   # relative to the repository root
    old: str    # exact source text, once in the file
    new: str
    tests: str  # pytest arguments: files, -k
    harm: str   # what a user would suffer


BUGS = [
    # -- the six planted by the audit of issue #26 --
    Bug("rslora-saved-as-false", "lora/lora.py",
        '"use_rslora": cfg["rslora"]',
        '"use_rslora": False',
        'tests/test_lora.py -k "rslora or peft"',
        "every consumer of an rsLoRA adapter (PEFT, ours) scales it by alpha/r instead of alpha/sqrt(r)"),
    Bug("resume-skips-optimizer", "train.py",
        '        run.optimizer.load_state_dict(state["optimizer"])\n',
        "",
        "tests/test_reliability.py",
        "--resume restarts Adam's moments at zero: the resumed run differs from the uninterrupted one"),
    Bug("double-quant-last-group-previous-scale", "quant/nf4.py",
        "out[whole:].mul_(absmax2[whole // group].float())",
        "out[whole:].mul_(absmax2[whole // group - 1].float())",
        "tests/test_nf4.py",
        "weights with more than 256 blocks and a partial last group dequantize wrong at the tail"),
    Bug("eos-not-trained", "llama/chat.py",
        "mask += [trained for _, trained in run]",
        "mask += [False for _ in run]",
        "tests/test_corpus.py",
        "the model never learns to stop: the eos / <|im_end|> after each reply is out of the loss"),
    Bug("flex-mask-causal-only", "llama/model.py",
        "return (q >= kv) & (doc_ids[b, q] == doc_ids[b, kv])",
        "return q >= kv",
        "tests/test_model.py -k packed",
        "on CUDA, packed documents attend to each other"),
    Bug("bf16-attention-padded-at-the-front", "llama/ops.py",
        "+ [0, n]) if n else t",
        "+ [n, 0]) if n else t",
        "tests/test_model.py -k causal_sdpa",
        "on CPU in bf16, every document's tokens also attend to zero rows placed before it (and the head's chunks "
        "lose their first rows)"),
    Bug("wk-permuted-with-n-heads", "llama/checkpoint.py",
        '"attention.wk": args.n_kv_heads',
        '"attention.wk": args.n_heads',
        "tests/test_checkpoint.py",
        "HF checkpoints of GQA models (70B) load with scrambled keys; exports and adapters likewise"),
    # -- model --
    Bug("rope-positions-do-not-restart", "llama/model.py",
        "return idx - start_of_run",
        "return idx",
        "tests/test_model.py -k doc_positions",
        "packed documents get RoPE positions of the row, not of the document (the contract of doc_ids)"),
    Bug("gqa-heads-tiled-not-interleaved", "llama/model.py",
        "return x.repeat_interleave(rep, dim=1) if rep > 1 else x",
        "return x.repeat(1, rep, 1, 1) if rep > 1 else x",
        "tests/test_model.py -k logits_match",
        "query heads read the wrong K/V head on every GQA model (70B)"),
    Bug("rmsnorm-eps-outside-sqrt", "llama/ops.py",
        "r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)",
        "r = 1 / (xf.pow(2).mean(-1, keepdim=True).sqrt() + eps)",
        "tests/test_model.py -k logits_match",
        "every norm differs from Meta's/HF's formula: logits drift from the pretrained model's"),
    Bug("attention-scale-1-over-d", "llama/model.py",
        "out = F.scaled_dot_product_attention(q, k, v, attn_mask=cache_mask, is_causal=cache_mask is None and T > 1)",
        "out = F.scaled_dot_product_attention(q, k, v, attn_mask=cache_mask, is_causal=cache_mask is None and T > 1,\n"
        "                                                 scale=1 / q.shape[-1])",
        "tests/test_model.py -k logits_match",
        "attention scores scaled by 1/D instead of 1/sqrt(D): the pretrained model is broken"),
    Bug("rope-rotates-backwards", "llama/model.py",
        "out = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1)",
        "out = torch.stack((a * cos + b * sin, b * cos - a * sin), dim=-1)",
        "tests/test_model.py -k rope",
        "positions rotate the other way from Meta's: relative positions are mirrored"),
    Bug("rmsnorm-backward-without-mean-term", "llama/ops.py",
        "gx = (r * (gn - xh * (gn * xh).mean(-1, keepdim=True))).to(x.dtype)",
        "gx = (r * gn).to(x.dtype)",
        "tests/test_model.py -k rmsnorm",
        "every gradient that flows through a norm (all of them, for LoRA too) is wrong while the loss looks fine"),
    Bug("cross-entropy-gradient-without-onehot", "llama/ops.py",
        "p[torch.arange(c, device=y.device), y] -= 1  # - onehot(y)",
        "pass",
        "tests/test_model.py -k head_ce",
        "the loss's gradient is softmax alone: training pushes every logit down, the targets included"),
    # -- LoRA --
    Bug("lora-scale-r-over-alpha", "lora/lora.py",
        "self.scale = alpha / math.sqrt(r) if rslora else alpha / r",
        "self.scale = alpha / math.sqrt(r) if rslora else r / alpha",
        "tests/test_lora.py -k formula",
        "the adapter trains and exports at the wrong strength (r 16, alpha 32: 1/4 of it)"),
    Bug("peft-keys-without-base-model-prefix", "lora/lora.py",
        'tensors[f"{PREFIX}{hf}.lora_A.weight"] = m.lora_A.detach()\n'
        '            tensors[f"{PREFIX}{hf}.lora_B.weight"] = B',
        'tensors[f"{hf}.lora_A.weight"] = m.lora_A.detach()\n'
        '            tensors[f"{hf}.lora_B.weight"] = B',
        "tests/test_lora.py -k peft_reproduces",
        "PEFT loads the saved adapter with a warning about missing keys and runs the base model unchanged"),
    Bug("lora-backward-redraws-another-dropout-mask", "lora/lora.py",
        "plan = drop_plan(x.numel(), p, ctx.seed, x.device, dt) if p > 0 else None",
        "plan = drop_plan(x.numel(), p, ctx.seed + 1, x.device, dt) if p > 0 else None",
        "tests/test_lora.py -k dropout_gradients",
        "with dropout on (the default 0.05) the adapters' gradients belong to another mask than the forward's"),
    Bug("lora-b-rows-not-permuted-for-hf", "lora/lora.py",
        "                B = permute_for_hf(B, heads)  # rows follow HF's rotary layout; A acts on inputs, unchanged",
        "                pass",
        "tests/test_lora.py -k peft_reproduces",
        "in PEFT the q/k adapters of a saved adapter act on the wrong rotary features"),
    Bug("merge-skips-dequantized-weight", "lora/lora.py",
        "        self.base.weight.copy_(w)\n",
        "",
        "tests/test_lora.py -k merge",
        "a QLoRA merge writes randomly initialised projections instead of base + adapter"),
    Bug("merged-weight-without-the-update", "lora/lora.py",
        "return (w.float() + self.delta_weight().to(w.device)).to(w.dtype)",
        "return w.float().to(w.dtype)",
        "tests/test_merge.py -k right_merge",
        "the merged folder (--merge, and the merge command) is the base model: the adapter's training is lost"),
    # -- NF4 --
    Bug("nf4-code-table-digit-swapped", "quant/nf4.py",
        "0.44070982933044434, 0.5626170039176941",
        "0.44070982933044434, 0.5262170039176941",
        "tests/test_nf4.py -k levels",
        "one of the 16 levels is wrong: every weight on it dequantizes off bitsandbytes' value"),
    Bug("nf4-statistics-rounded-by-dtype-casts", "quant/nf4.py",
        "            if after.dtype != before.dtype:\n",
        "            if False:\n",
        "tests/test_nf4.py -k dtype_casts",
        "model.to(bfloat16) rounds the fp32 double-quant statistics: every QLoRA weight dequantizes off"),
    Bug("qlora-quantizes-the-output-head", "quant/nf4.py",
        'def quantize_on_load(skip: tuple[str, ...] = ("output", "tok_embeddings"),',
        'def quantize_on_load(skip: tuple[str, ...] = ("tok_embeddings",),',
        "tests/test_nf4.py -k quantize_on_load",
        "train.py's QLoRA puts the output head in 4 bits, unlike the QLoRA recipe it claims to follow"),
    Bug("hf-export-without-rotary-permutation", "llama/export.py",
        "                t = permute_for_hf(t, heads)\n",
        "                pass\n",
        "tests/test_checkpoint.py -k hf_export",
        "an exported HF model (and a --merge in HF layout) loads in transformers and produces garbage"),
    # -- data and training --
    Bug("llama2-inst-without-space", "llama/chat.py",
        'segs += [(tok.bos_id, False), (f"[INST] {msgs[k][\'content\'].strip()} [/INST]", False)]',
        'segs += [(tok.bos_id, False), (f"[INST]{msgs[k][\'content\'].strip()} [/INST]", False)]',
        "tests/test_tokenizer_chat.py -k llama2",
        "training prompts are not Meta's: the chat model is fine-tuned on a format it never saw"),
    Bug("mask-shifted-by-one-in-batch", "llama/corpus.py",
        "np.where(split.mask[a + 1: e] != 0, split.ids[a + 1: e], -100)",
        "np.where(split.mask[a: e - 1] != 0, split.ids[a + 1: e], -100)",
        "tests/test_corpus.py -k build_batch",
        "the last prompt token's successor is trained and the reply's last token is not"),
    Bug("packed-documents-share-one-id", "llama/corpus.py",
        "doc_ids[b, t: t + n] = d",
        "doc_ids[b, t: t + n] = 0",
        "tests/test_corpus.py -k build_batch",
        "packed samples attend to the samples before them in the row"),
    Bug("loss-normalised-per-micro-batch", "train.py",
        "/ max(n_target, 1)",
        '/ max(int((b["labels"] != -100).sum()), 1)',
        "tests/test_train.py -k train_step",
        "gradient accumulation weights tokens unequally and scales the gradient by the micro-batch count"),
    Bug("adapter-gradients-averaged-not-summed", "train.py",
        "torch.distributed.all_reduce(flat)",
        "torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.AVG)",
        "tests/test_train.py -k all_reduce",
        "with N processes the step is 1/N of the gradient (the loss is already normalised globally)"),
]


def product_files() -> list[str]:
    """Tracked and new (not ignored) files of the working tree, as git lists them."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, check=True).stdout.decode()
    return [f for f in out.split("\0") if f and (ROOT / f).is_file()]


def copy_product(dest: Path, files: list[str]) -> None:
    for f in files:
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dest / f)


def apply(bug: Bug, tree: Path) -> str | None:
    """Plant the bug in the copy; None, or why the patch does not apply."""
    path = tree / bug.file
    if not path.is_file():
        return f"{bug.file} does not exist"
    text = path.read_text()
    n = text.count(bug.old)
    if n != 1:
        return f"the old text occurs {n} times in {bug.file} (expected once): update the snippet"
    path.write_text(text.replace(bug.old, bug.new))
    return None


def child_env(tree: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONDONTWRITEBYTECODE="1")
    # tests/conftest.py finds Meta's tokenizer beside the checkout (../shared); the copy has no such sibling
    tok = ROOT.parent / "shared" / "fixtures" / "llama2-tokenizer.model"
    if tok.exists():
        env.setdefault("LLAMA2_TOKENIZER", str(tok))
    return env


def run_tests(tree: Path, tests: str, timeout: int) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-m", "not slow", "-p", "no:cacheprovider",
           *shlex.split(tests)]
    try:
        p = subprocess.run(cmd, cwd=tree, env=child_env(tree), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {timeout}s"
    return p.returncode, p.stdout + p.stderr


def summary(output: str) -> tuple[str, str]:
    """(tests run, first failing test) from pytest -q's output."""
    totals = re.findall(r"^.*\b\d+ (?:passed|failed|errors?|skipped|deselected)\b.* in [\d.]+s.*$", output, re.M)
    ran = str(sum(map(int, re.findall(r"(\d+) (?:passed|failed|error)", totals[-1])))) if totals else "?"
    failed = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.M)
    return ran, failed[1] if failed else ""


def check_imports(tree: Path) -> None:
    """The copy's modules, not an installed checkout's, must be the ones the tests import."""
    code = "import llama, lora, quant, train; print(*(m.__file__ for m in (llama, lora, quant, train)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tree, env=child_env(tree), capture_output=True,
                         text=True, check=True).stdout.split()
    if not all(Path(f).resolve().is_relative_to(tree.resolve()) for f in out):
        sys.exit(f"error: the tests would import the product from {out}, not from the copy in {tree}")


def try_bug(bug: Bug, tree: Path, clean: bool, timeout: int) -> tuple[bool, str, str, str]:
    """(as expected, outcome, tests run, first failing test or why not). Expected: caught, or with `clean`
    (no patch) passing."""
    if not clean and (problem := apply(bug, tree)):
        return False, "PATCH FAILS", "-", problem
    rc, out = run_tests(tree, bug.tests, timeout)
    ran, first = summary(out)
    if clean:
        ok, outcome = rc == 0, "passes" if rc == 0 else f"FAILS (exit {rc})"
    else:
        ok, outcome = rc == 1, {0: "SURVIVED", 1: "caught"}.get(rc, f"ERROR (exit {rc})")
    if not ok:
        print(out[-3000:], file=sys.stderr)
    last = out.strip().splitlines()[-1] if out.strip() else ""
    return ok, outcome, ran, first or ("" if rc in (0, 1) else last)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="list the bugs and their tests")
    ap.add_argument("--only", action="append", metavar="NAME", help="run this bug only (repeatable)")
    ap.add_argument("--clean", action="store_true", help="run each selection without its bug: it must pass")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per bug")
    args = ap.parse_args(argv)
    bugs = BUGS
    if args.only:
        if unknown := sorted(set(args.only) - {b.name for b in BUGS}):
            ap.error(f"unknown bug {', '.join(unknown)}; --list shows the names")
        bugs = [b for b in BUGS if b.name in args.only]
    if args.list:
        for b in bugs:
            print(f"{b.name}\n    {b.file}: {b.harm}\n    tests: {b.tests}")
        return 0

    files = product_files()
    rows, bad, t_all = [], 0, time.time()
    with tempfile.TemporaryDirectory(prefix="mutations-") as tmp:
        for i, b in enumerate(bugs):
            tree = Path(tmp) / str(i)
            copy_product(tree, files)
            if i == 0:
                check_imports(tree)
            t0 = time.time()
            ok, outcome, ran, by = try_bug(b, tree, args.clean, args.timeout)
            bad += not ok
            secs = f"{time.time() - t0:.0f}"
            rows.append((f"`{b.name}`", f"`{b.tests}` ({ran})", outcome, f"`{by}`" if by else "", secs))
            print(f"{b.name}: {outcome} {by} ({secs}s)", flush=True)
            shutil.rmtree(tree, ignore_errors=True)

    print("\n| bug | tests run | outcome | caught by | seconds |\n|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print(f"\n{len(rows) - bad}/{len(rows)} {'pass' if args.clean else 'caught'}, {time.time() - t_all:.0f}s in all")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
