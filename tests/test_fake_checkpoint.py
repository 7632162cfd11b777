"""benchmarks/make_fake_checkpoint.py writes Meta's layout: checked against Meta's published facts (parameter
counts, params.json, the model-parallel split rule) and by loading it through llama.load_model and train.py.

The reference for the shard merge is written out here by hand (torch.load each shard in full, concatenate along
the split dimension), independently of llama.checkpoint's streaming merge that it checks.
"""
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # end-to-end: subprocesses / whole training steps


ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("make_fake_checkpoint", ROOT / "benchmarks" / "make_fake_checkpoint.py")
mfc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mfc)

# Meta's params.json files (llama-2-7b/13b/70b) and the parameter counts Hugging Face reports for those models.
META_PARAMS = {
    "7b": '{"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05, "vocab_size": -1}',
    "13b": '{"dim": 5120, "multiple_of": 256, "n_heads": 40, "n_layers": 40, "norm_eps": 1e-05, "vocab_size": -1}',
    "70b": '{"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64, "n_kv_heads": 8, '
           '"n_layers": 80, "norm_eps": 1e-05, "vocab_size": -1}',
}
N_PARAMS = {"7b": 6_738_415_616, "13b": 13_015_864_320, "70b": 68_976_648_192}
SHARDS = {"7b": 1, "13b": 2, "70b": 8}


@pytest.mark.parametrize("size", ["7b", "13b", "70b"])
def test_full_size_layout_matches_meta(size):
    """Without writing 13-138 GB: params.json text, shard count, parameter count, and each shard's shapes."""
    params, shards = mfc.scaled_params(size)
    assert json.dumps(params) == META_PARAMS[size]
    assert shards == SHARDS[size]
    shapes = mfc.full_shapes(params, vocab=32000)
    assert sum(math.prod(s) for n, s in shapes.items() if n != "rope.freqs") == N_PARAMS[size]
    ffn = {"7b": 11008, "13b": 13824, "70b": 28672}[size]
    assert shapes["layers.0.feed_forward.w1.weight"] == (ffn, params["dim"])
    # Meta's split: column-parallel rows, row-parallel (and the embedding's) columns, norms whole
    n = shards
    assert mfc.shard_shape("layers.0.attention.wk.weight", shapes["layers.0.attention.wk.weight"], n)[0] * n == \
        shapes["layers.0.attention.wk.weight"][0]
    assert mfc.shard_shape("output.weight", (32000, params["dim"]), n) == (32000 // n, params["dim"])
    assert mfc.shard_shape("tok_embeddings.weight", (32000, params["dim"]), n) == (32000, params["dim"] // n)
    assert mfc.shard_shape("layers.0.feed_forward.w2.weight", (params["dim"], ffn), n) == (params["dim"], ffn // n)
    assert mfc.shard_shape("layers.0.ffn_norm.weight", (params["dim"],), n) == (params["dim"],)


@pytest.fixture
def ckpt13(tmp_path, llama2_tokenizer_path):
    """A 13B-layout (two shards) checkpoint at 1/16 scale: dim 320, 2 layers, vocab 32000; ~2 s to write."""
    out = tmp_path / "llama-2-13b"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_fake_checkpoint.py"), "--size", "13b",
                        "--out", str(out), "--scale", "0.0625", "--tokenizer", str(llama2_tokenizer_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return out


def _merge_by_hand(folder: Path) -> dict[str, torch.Tensor]:
    shards = [torch.load(f, weights_only=True) for f in sorted(folder.glob("consolidated.*.pth"))]  # no mmap
    out = {}
    for name in shards[0]:
        kind = name.split(".")[-2] if name.endswith(".weight") else name
        if kind in ("wq", "wk", "wv", "w1", "w3", "output"):
            out[name] = torch.cat([s[name] for s in shards], 0)
        elif kind in ("wo", "w2", "tok_embeddings"):
            out[name] = torch.cat([s[name] for s in shards], 1)
        else:
            assert all(torch.equal(s[name], shards[0][name]) for s in shards), f"{name} not replicated"
            out[name] = shards[0][name]
    return out


def test_two_shard_checkpoint_is_meta_layout_and_loads(ckpt13):
    files = sorted(p.name for p in ckpt13.iterdir())
    assert files == ["checklist.chk", "consolidated.00.pth", "consolidated.01.pth", "params.json", "tokenizer.model"]
    params = json.loads((ckpt13 / "params.json").read_text())
    assert list(params) == list(json.loads(META_PARAMS["13b"]))
    assert params["n_heads"] == 40 and params["vocab_size"] == -1 and params["dim"] == 320 and params["n_layers"] == 2
    import hashlib
    for line in (ckpt13 / "checklist.chk").read_text().splitlines():
        md5, name = line.split()
        assert hashlib.md5((ckpt13 / name).read_bytes()).hexdigest() == md5

    s0, s1 = (torch.load(ckpt13 / f"consolidated.0{i}.pth", weights_only=True) for i in (0, 1))
    assert set(s0) == set(s1) and "rope.freqs" in s0
    assert all(t.dtype == torch.bfloat16 for t in [*s0.values(), *s1.values()])
    hd = params["dim"] // params["n_heads"]
    torch.testing.assert_close(s0["rope.freqs"].float(), 1.0 / 10000 ** (torch.arange(0, hd, 2) / hd), rtol=1e-2, atol=0)
    assert s0["layers.0.attention.wq.weight"].shape == (160, 320) and s0["layers.0.attention.wo.weight"].shape == (320, 160)
    assert s0["tok_embeddings.weight"].shape == (32000, 160) and s0["output.weight"].shape == (16000, 320)
    w = s0["layers.1.feed_forward.w2.weight"].float()  # filled (not the skeleton's empty space), ~N(0, 0.02^2)
    assert abs(w.std().item() - 0.02) < 1e-3 and abs(w.mean().item()) < 1e-3
    assert not torch.equal(s0["layers.0.attention.wq.weight"], s1["layers.0.attention.wq.weight"])

    from llama import load_model
    model = load_model(ckpt13, dtype=torch.bfloat16)  # streaming merge through mmap, one layer at a time
    ref = _merge_by_hand(ckpt13)
    got = model.state_dict()
    assert set(got) == set(ref) - {"rope.freqs"}
    for name, t in got.items():
        assert torch.equal(t, ref[name]), name
    assert model.args.vocab_size == 32000 and model.args.n_layers == 2


def test_train_py_runs_qlora_on_it(ckpt13, tmp_path):
    data = tmp_path / "tiny.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"It is {2 * i}."}]} for i in range(4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--ckpt", str(ckpt13), "--data", str(data),
                        "--quant", "nf4", "--max-steps", "1", "--seq-len", "32", "--batch-size", "2",
                        "--grad-accum", "1", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "NF4-quantized" in r.stdout
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1] and math.isfinite(metrics[0]["loss"])
    # a random model predicts ~uniformly over the 32,000 tokens
    assert abs(metrics[0]["loss"] - math.log(32000)) < 1.0
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "adapter" / "adapter_config.json").is_file()
