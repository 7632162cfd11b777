"""Without triton (macOS, Windows: it has Linux wheels only) the product imports and trains on the CPU paths.

A fresh process makes `import triton` fail as it does when triton is not installed (a None entry in
sys.modules: ImportError on import, None from importlib.util.find_spec), then imports llama, lora, quant and
train, checks an NF4 matmul and its backward against bitsandbytes' dequantized weight, and runs a short QLoRA
training. CI (.ci/run) also runs the demo and the fast tests after uninstalling triton.
"""
import json
import subprocess
import sys

import pytest

import train

SCRIPT = r"""
import json, sys
sys.modules["triton"] = None  # as if not installed
import importlib.util
assert importlib.util.find_spec("triton") is None

import llama, lora, quant, train  # nothing imports triton at import time
import bitsandbytes.functional as bnbF
import torch

torch.manual_seed(0)
packed, state = bnbF.quantize_4bit(torch.randn(96, 128), blocksize=64, compress_statistics=True, quant_type="nf4")
w = bnbF.dequantize_4bit(packed, state)  # the reference weight, from bitsandbytes
errs = {}
for m in (3, 40):  # the sliced decode path (M <= 16) and the whole-weight path
    x = torch.randn(m, 128, requires_grad=True)
    y = quant.nf4_matmul(x, packed, state)  # backend "auto"
    g = torch.randn_like(y)
    y.backward(g)
    errs[m] = [(y - x.detach() @ w.T).abs().max().item(), (x.grad - g @ w).abs().max().item()]
rc = train.main(sys.argv[1:])
print(json.dumps({"errs": errs, "rc": rc, "triton": sys.modules["triton"] is None}))
"""


@pytest.mark.slow
def test_imports_and_trains_without_triton(tiny_train_ckpt, tmp_path):
    out = tmp_path / "out"
    args = ["--ckpt", str(tiny_train_ckpt), "--data", str(tiny_train_ckpt / "data.jsonl"), "--out", str(out),
            "--quant", "nf4", "--max-steps", "3", "--seq-len", "64", "--batch-size", "2", "--lr", "1e-2"]
    r = subprocess.run([sys.executable, "-c", SCRIPT, *args], cwd=train.ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.splitlines()[-1])
    assert res["rc"] == 0 and res["triton"], r.stdout
    for m, (fwd, bwd) in res["errs"].items():
        assert fwd < 1e-5 and bwd < 1e-5, (m, fwd, bwd)
    metrics = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(m["loss"] > 0 for m in metrics)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
