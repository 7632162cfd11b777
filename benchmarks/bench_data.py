"""Data preparation at scale: memory per corpus token, cold tokens/s, warm start, RSS while training draws.

A synthetic corpus shaped like Tulu 2's SFT mixture (`{"dataset", "id", "messages"}` rows, 1-4 exchanges,
an optional system prompt, 50-4,000 tokens per dialog, log-uniform, replies longer than prompts) is written
as .jsonl; `--rows` scales it. Each measurement runs in a fresh Python process that first imports what it
needs (the baseline), so peaks are the data work's own:

  new cold   `train.py --prepare-data` (tokenizer workers: --workers, default every core)
  new warm   the same flags without --prepare-data, stopped where the model would load: seconds of data
             work (tokenizer, content hashes, opening and checking the memory-mapped corpus, row plans)
  new draw   one epoch of micro-batches drawn from the prepared corpus: RSS growth (memory-mapped pages)
  old        the loader this replaced (train.py at git 8463287: load_data + pack, run from a temp copy
             against this checkout's llama/), whose lists and tensors were held for the whole run

    python benchmarks/bench_data.py --rows 20000
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OLD_COMMIT = "8463287"

WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from or one had by "
         "word but not what all were we when your can said there use an each which she do how their if will up "
         "other about out many then them these so some her would make like him into time has look two more write "
         "go see number no way could people my than first water been call who oil its now find long down day did "
         "get come made may part model data train token layer value matrix gradient function python code return "
         "answer question because example result however therefore explain").split()

RUNNER = r'''
import json, os, resource, sys, time
mode, cfg = sys.argv[1], json.loads(sys.argv[2])

def rss():  # current resident set, bytes
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

if mode == "old":
    import importlib.util
    spec = importlib.util.spec_from_file_location("oldtrain", cfg["old_train"])
    old = importlib.util.module_from_spec(spec)
    sys.modules["oldtrain"] = old
    spec.loader.exec_module(old)
    base_peak, base = peak(), rss()
    t0 = time.time()
    c = old.TrainConfig(ckpt=cfg["ckpt"], data=[cfg["data"]], template=cfg["template"], seq_len=cfg["seq_len"])
    tok, _ = old.load_tokenizer(c)
    tr, va, st = old.load_data(c, tok)
    rows = old.pack(tr, c.seq_len, tok.eos_id)
    dt = time.time() - t0
    print(json.dumps({"seconds": dt, "tokens": st["total"]["tokens"], "samples": len(tr), "peak_above": peak() - base_peak,
                      "held": rss() - base, "rows": len(rows["tokens"])}))
    sys.exit(0)

import train
from llama import corpus
base_peak = peak()
argv = ["--ckpt", cfg["ckpt"], "--data", cfg["data"], "--out", cfg["out"], "--template", cfg["template"],
        "--seq-len", str(cfg["seq_len"]), "--data-workers", str(cfg["workers"])]
if mode == "cold":
    t0 = time.time()
    assert train.main(argv + ["--prepare-data"]) == 0
    dt = time.time() - t0
    meta = json.loads(open(os.path.join(cfg["out"], "data", "meta.json")).read())
    print(json.dumps({"seconds": dt, "tokens": meta["stats"]["total"]["tokens"], "peak_above": peak() - base_peak,
                      "worker_peak": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))
elif mode == "warm":
    class Reached(Exception):
        pass

    def model_load(*a, **kw):
        raise Reached
    train.build_model = model_load
    t0 = time.time()
    try:
        train.main(argv)
        raise SystemExit("the run did not reach the model load")
    except Reached:
        dt = time.time() - t0
    print(json.dumps({"seconds": dt, "peak_above": peak() - base_peak}))
elif mode == "draw":
    import numpy as np
    from llama import Tokenizer
    tok = Tokenizer(os.path.join(cfg["ckpt"], "tokenizer.model"))
    base = rss()
    meta, splits = corpus.open_corpus(os.path.join(cfg["out"], "data"))
    split = splits["train"]
    rows = corpus.make_rows(split, cfg["seq_len"], True)
    t0 = time.time()
    perm = np.random.default_rng(0).permutation(len(rows))
    for s in range(0, len(rows), 4):  # one epoch in random order, micro-batches of 4 rows
        b = corpus.build_batch(split, rows, perm[s: s + 4], cfg["seq_len"], tok.eos_id)
    print(json.dumps({"seconds": time.time() - t0, "growth": rss() - base, "tokens": int(split.offsets[-1]),
                      "rows": len(rows)}))
'''


def make_corpus(path: Path, rows: int, tokenizer, seed: int = 0) -> dict:
    """Tulu-2-shaped chat rows; each dialog's token count drawn log-uniformly in [50, 4000]."""
    rng = random.Random(seed)
    sample = " ".join(rng.choice(WORDS) for _ in range(2000))
    per_word = len(tokenizer.encode(sample)) / 2000  # tokens per word of this tokenizer
    sources = ["flan_v2", "cot", "oasst1", "lima", "gpt4_alpaca", "code_alpaca", "sharegpt", "wizardlm", "open_orca",
               "science", "hard_coded"]
    n_bytes = 0
    with open(path, "w") as f:
        for i in range(rows):
            target = math.exp(rng.uniform(math.log(50), math.log(4000)))
            turns = rng.choice([1, 1, 1, 2, 2, 3, 4])
            msgs = [{"role": "system", "content": "You are a helpful assistant."}] if rng.random() < 0.2 else []
            words = max(int(target / per_word) - 10 * turns, 4 * turns)
            for _ in range(turns):
                share = words / turns
                q = max(1, int(share * rng.uniform(0.1, 0.4)))
                a = max(1, int(share) - q)
                msgs.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=q)).capitalize() + "?"})
                msgs.append({"role": "assistant", "content": " ".join(rng.choices(WORDS, k=a)).capitalize() + "."})
            line = json.dumps({"dataset": rng.choice(sources), "id": f"row_{i}", "messages": msgs}) + "\n"
            n_bytes += len(line)
            f.write(line)
    return {"rows": rows, "bytes": n_bytes}


def run(mode: str, cfg: dict, runner: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, str(runner), mode, json.dumps(cfg)], cwd=ROOT, env=env, capture_output=True,
                       text=True)
    if r.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=20000)
    p.add_argument("--tokenizer", default=str(ROOT / "demo" / "tiny-llama" / "tokenizer.model"))
    p.add_argument("--template", default="tulu")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--workers", type=int, default=0, help="tokenizer processes for the new path (0: every core)")
    p.add_argument("--no-old", action="store_true", help="skip the old loader (git %s)" % OLD_COMMIT)
    p.add_argument("--out", default=str(ROOT / "results"))
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from llama import Tokenizer

    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        tmp = Path(tmp)
        ckpt = tmp / "ckpt"  # --prepare-data needs only the tokenizer
        ckpt.mkdir()
        (ckpt / "tokenizer.model").write_bytes(Path(args.tokenizer).read_bytes())
        data = tmp / "tulu_like.jsonl"
        t0 = time.time()
        shape = make_corpus(data, args.rows, Tokenizer(str(ckpt / "tokenizer.model")))
        print(f"corpus: {args.rows:,} rows, {shape['bytes'] / 2**20:.1f} MiB, written in {time.time() - t0:.1f}s",
              flush=True)
        runner = tmp / "runner.py"
        runner.write_text(RUNNER)
        cfg = {"ckpt": str(ckpt), "data": str(data), "out": str(tmp / "out"), "template": args.template,
               "seq_len": args.seq_len, "workers": args.workers}
        res = {"cold": run("cold", cfg, runner)}
        tokens = res["cold"]["tokens"]
        print(f"new cold: {tokens:,} tokens in {res['cold']['seconds']:.1f}s", flush=True)
        res["warm"] = run("warm", cfg, runner)
        res["draw"] = run("draw", cfg, runner)
        if not args.no_old:
            old_train = tmp / "old_train.py"
            old_train.write_text(subprocess.run(["git", "show", f"{OLD_COMMIT}:train.py"], cwd=ROOT, check=True,
                                                capture_output=True, text=True).stdout)
            res["old"] = run("old", {**cfg, "old_train": str(old_train)}, runner)
            print(f"old: {res['old']['tokens']:,} tokens in {res['old']['seconds']:.1f}s", flush=True)

    new = {"tokens_per_s": tokens / res["cold"]["seconds"], "peak_bytes_per_token": res["cold"]["peak_above"] / tokens,
           "warm_start_s": res["warm"]["seconds"], "training_growth_bytes_per_token": res["draw"]["growth"] / tokens}
    rows = [("new (llama.corpus)", new)]
    if "old" in res:
        o = res["old"]
        rows.append((f"old (git {OLD_COMMIT})", {
            "tokens_per_s": o["tokens"] / o["seconds"], "peak_bytes_per_token": o["peak_above"] / o["tokens"],
            "warm_start_s": o["seconds"],  # the old loader had no cache: every start (and --resume) redid it
            "training_growth_bytes_per_token": o["held"] / o["tokens"]}))
    print(f"\n{args.rows:,} rows, {tokens:,} corpus tokens, {shape['bytes'] / 2**20:.0f} MiB of .jsonl, "
          f"template {args.template}, seq_len {args.seq_len}, {os.cpu_count()} cores\n")
    print("| loader | cold tokens/s | peak RSS of preparing, bytes/token | warm start to model load, s "
          "| RSS held while training, bytes/token |")
    print("|---|---:|---:|---:|---:|")
    for name, r in rows:
        print(f"| {name} | {r['tokens_per_s'] / 1e6:.2f}M | {r['peak_bytes_per_token']:.1f} | {r['warm_start_s']:.2f} "
              f"| {r['training_growth_bytes_per_token']:.1f} |")
    if "old" in res:
        print(f"\nnew/old: {new['tokens_per_s'] / rows[1][1]['tokens_per_s']:.2f}x tokens/s, "
              f"{new['peak_bytes_per_token'] / rows[1][1]['peak_bytes_per_token']:.2f}x peak memory per token")
    print(f"new: tokenizer workers' peak RSS {res['cold']['worker_peak'] / 2**20:.0f} MiB each (independent of corpus "
          f"size); draw of one epoch {res['draw']['seconds']:.1f}s for {res['draw']['rows']:,} rows")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
              "cores": os.cpu_count(), "python": platform.python_version(), "args": vars(args), "corpus": shape,
              "tokens": tokens, "raw": res, "table": dict(rows), "load_average": os.getloadavg()}
    (out / "bench_data.json").write_text(json.dumps(record, indent=2))
    print(f"\nwritten {out / 'bench_data.json'}")


if __name__ == "__main__":
    main()
