"""llama.checkpoint against transformers: Meta folders (1 and 2 model-parallel shards, split by Meta's rule)
and HF folders (sharded or not) load to the same logits as LlamaForCausalLM; our HF export loads in
transformers; the streaming hook, peak memory while loading, and the error messages."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import hf_to_meta_state_dict, train_sentencepiece
import llama.export as E
from llama import ModelArgs, Transformer, load_model, save_model
from llama.checkpoint import (CheckpointError, find_tokenizer, hf_to_meta_key, meta_to_hf_key, permute_for_hf,
                              unpermute_from_hf)

ROOT = Path(__file__).resolve().parent.parent
DIM, LAYERS, HEADS, KV_HEADS, VOCAB, HIDDEN = 64, 2, 4, 2, 256, 192
PARAMS = dict(dim=DIM, n_layers=LAYERS, n_heads=HEADS, n_kv_heads=KV_HEADS, vocab_size=VOCAB, multiple_of=32,
              norm_eps=1e-6)
TOKENS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))


def hf_config(**kw) -> LlamaConfig:
    cfg = dict(hidden_size=DIM, intermediate_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
               num_key_value_heads=KV_HEADS, vocab_size=VOCAB, rms_norm_eps=1e-6, rope_theta=10000.0,
               max_position_embeddings=128, tie_word_embeddings=False, attn_implementation="eager")
    return LlamaConfig(**{**cfg, **kw})


@pytest.fixture(scope="module")
def hf():
    torch.manual_seed(0)
    model = LlamaForCausalLM(hf_config()).eval()
    with torch.no_grad():  # HF initialises norms to 1: randomise them so a mixed-up norm cannot pass
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def ref_logits(hf):
    with torch.no_grad():
        return hf(TOKENS).logits


def meta_state_dict(hf) -> dict[str, torch.Tensor]:
    return hf_to_meta_state_dict(hf, HEADS, KV_HEADS)


def split_like_meta(sd: dict, n: int) -> list[dict]:
    """Meta's model-parallel split, written independently of the loader: ColumnParallelLinear (wq wk wv w1 w3
    output) splits rows, RowParallelLinear (wo w2) and ParallelEmbedding split columns, norms replicate."""
    shards = [{} for _ in range(n)]
    for name, t in sd.items():
        kind = name.split(".")[-2]
        dim = 0 if kind in ("wq", "wk", "wv", "w1", "w3", "output") else 1 if kind in ("wo", "w2", "tok_embeddings") else None
        for i in range(n):
            shards[i][name] = t.chunk(n, dim)[i].clone() if dim is not None else t.clone()
    for s in shards:
        s["rope.freqs"] = torch.randn(DIM // HEADS // 2)  # Meta's files carry it; the loader ignores it
    return shards


def write_meta(folder: Path, sd: dict, n_shards: int = 1, **params) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, shard in enumerate(split_like_meta(sd, n_shards)):
        torch.save(shard, folder / f"consolidated.{i:02d}.pth")
    p = {**PARAMS, "vocab_size": -1, "some_future_key": True, **params}  # -1: from the weights
    (folder / "params.json").write_text(json.dumps({k: v for k, v in p.items() if v is not None}))
    return folder


def logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(tokens)


# ---- names and the q/k permutation


def test_key_maps_match_transformers_names(hf):
    hf_keys = set(hf.state_dict())
    with torch.device("meta"):
        ours = Transformer(ModelArgs(**PARAMS))
    meta_keys = {n for n, _ in ours.named_parameters()}
    assert {meta_to_hf_key(k) for k in meta_keys} == hf_keys
    assert {hf_to_meta_key(k) for k in hf_keys} == meta_keys
    assert meta_to_hf_key("layers.3.attention.wq") == "model.layers.3.self_attn.q_proj"
    assert hf_to_meta_key("model.layers.0.mlp.down_proj.lora_B.weight") == "layers.0.feed_forward.w2.lora_B.weight"
    for bad in ("layers.0.attention.wx.weight", "model.layers.0.self_attn.rotary_emb.inv_freq", "lm_head_x"):
        with pytest.raises(ValueError):
            meta_to_hf_key(bad) if not bad.startswith("model") else hf_to_meta_key(bad)


def test_permutation_is_a_row_permutation_and_inverse():
    w = torch.arange(2 * 8 * 3).reshape(16, 3)  # 2 heads of head_dim 8
    p = permute_for_hf(w, 2)
    # head 0, HF rows 0..3 are Meta rows 0,2,4,6 (first of each pair), HF rows 4..7 are Meta rows 1,3,5,7
    assert p[:8, 0].tolist() == [w[i, 0].item() for i in (0, 2, 4, 6, 1, 3, 5, 7)]
    assert torch.equal(unpermute_from_hf(p, 2), w)
    b = torch.randn(16, 4)  # a LoRA B matrix [out, r] permutes the same way
    assert torch.equal(permute_for_hf(b, 2), b[[0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15]])


# ---- loading: parity with transformers


@pytest.mark.parametrize("n_shards", [1, 2])
def test_meta_folder_matches_transformers(tmp_path, hf, ref_logits, n_shards):
    folder = write_meta(tmp_path / "meta", meta_state_dict(hf), n_shards)
    model = load_model(folder, dtype=torch.float32)
    err = (logits(model) - ref_logits).abs().max().item()
    print(f"Meta layout, {n_shards} shard(s): max |logits - HF| = {err:.2e}")
    assert model.args.vocab_size == VOCAB and err < 1e-4


@pytest.mark.parametrize("max_shard_size", [None, "100KB"])
def test_hf_folder_matches_transformers(tmp_path, hf, ref_logits, max_shard_size):
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True, **kw)
    sharded = (tmp_path / "hf" / "model.safetensors.index.json").exists()
    assert sharded == (max_shard_size is not None)
    model = load_model(tmp_path / "hf", dtype=torch.float32)
    err = (logits(model) - ref_logits).abs().max().item()
    print(f"HF layout (sharded={sharded}): max |logits - HF| = {err:.2e}")
    assert err < 1e-4


def test_hf_tied_embeddings(tmp_path):
    torch.manual_seed(1)
    hf = LlamaForCausalLM(hf_config(tie_word_embeddings=True)).eval()
    hf.save_pretrained(tmp_path / "tied")
    model = load_model(tmp_path / "tied", dtype=torch.float32)
    assert (logits(model) - hf(TOKENS).logits).abs().max().item() < 1e-4
    assert model.output.weight.data_ptr() != model.tok_embeddings.weight.data_ptr()  # untied copies


def test_dtype_and_eval_mode(tmp_path, hf, ref_logits):
    """dtype=bf16: every weight is the file's fp32 value rounded to bf16 (nothing else changed it), the RoPE
    tables stay fp32, the model is in eval mode, and its logits are transformers' fp32 ones within bf16's
    precision (a few 2^-8 steps of the logits' scale)."""
    sd = meta_state_dict(hf)
    model = load_model(write_meta(tmp_path / "m", sd), dtype=torch.bfloat16)
    assert not model.training
    params = dict(model.named_parameters())
    assert set(params) == set(sd)
    for name, p in params.items():
        assert p.dtype == torch.bfloat16 and torch.equal(p, sd[name].to(torch.bfloat16)), name
    assert model.rope_cos.dtype == torch.float32 and model.rope_cos.device.type == "cpu"
    D = DIM // HEADS  # angle[p, i] = p * theta^(-2i / D), the first 128 positions (fp32 angles stay exact there)
    angle = torch.arange(128.0, dtype=torch.float64)[:, None] * 10000.0 ** (-torch.arange(0, D, 2) / D)
    assert torch.allclose(model.rope_cos[:128].double(), angle.cos(), atol=1e-5)
    assert torch.allclose(model.rope_sin[:128].double(), angle.sin(), atol=1e-5)
    out = logits(model)
    assert out.dtype == torch.bfloat16
    err = (out.float() - ref_logits).abs().max().item()
    assert err < 8 * 2**-8 * ref_logits.abs().max().item(), err


def test_parameters_do_not_alias_the_files(tmp_path, hf, ref_logits):
    """Files are memory-mapped while loading; the loaded weights must be copies, not views of the files
    (overwriting a file in place afterwards must not change the model)."""
    hf.save_pretrained(tmp_path / "hf")
    for folder, pattern in ((write_meta(tmp_path / "meta", meta_state_dict(hf)), "*.pth"), (tmp_path / "hf", "*.safetensors")):
        model = load_model(folder, dtype=torch.float32)
        for f in folder.glob(pattern):
            with open(f, "r+b") as fh:
                fh.write(b"\x00" * f.stat().st_size)
        assert (logits(model) - ref_logits).abs().max().item() < 1e-4, folder.name


@pytest.mark.parametrize("heads, kv_heads, dim", [(4, 4, 64), (8, 1, 128)], ids=["no-GQA", "GQA-8"])
def test_qk_permutation_without_gqa_and_at_70b_ratio(tmp_path, heads, kv_heads, dim):
    """HF's rotary row order permutes wq within each of n_heads heads and wk within each of n_kv_heads heads.
    The models above use GQA 4/2; here the two other Llama-2 shapes: no GQA (7B, 13B: n_kv_heads = n_heads)
    and 70B's ratio (64 query heads on 8 K/V heads: 8 per K/V head). An HF folder loads to transformers'
    logits, and the Meta folder of the same weights exported in HF layout loads in transformers to them too."""
    torch.manual_seed(3)
    hidden = 32 * -(-int(8 * dim / 3) // 32)  # Meta's FFN size for multiple_of 32 (params.json has no hidden size)
    hf = LlamaForCausalLM(hf_config(hidden_size=dim, intermediate_size=hidden, num_attention_heads=heads,
                                    num_key_value_heads=kv_heads)).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
        want = hf(TOKENS).logits
    hf.save_pretrained(tmp_path / "hf")
    model = load_model(tmp_path / "hf", dtype=torch.float32)
    assert (model.args.n_heads, model.args.n_kv_heads) == (heads, kv_heads)
    assert (logits(model) - want).abs().max().item() < 1e-4

    meta = write_meta(tmp_path / "meta", hf_to_meta_state_dict(hf, heads, kv_heads), dim=dim, n_heads=heads,
                      n_kv_heads=None if kv_heads == heads else kv_heads)  # 7B/13B params.json: no n_kv_heads
    model = load_model(meta, dtype=torch.float32)
    assert model.args.n_kv_heads == kv_heads and (logits(model) - want).abs().max().item() < 1e-4
    save_model(model, tmp_path / "export", layout="hf")
    back = LlamaForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        assert (back.eval()(TOKENS).logits - want).abs().max().item() < 1e-4


# ---- saving


@pytest.mark.parametrize("max_shard_size", [5 * 10**9, 150_000])
def test_hf_export_loads_in_transformers(tmp_path, max_shard_size):
    torch.manual_seed(2)  # our own random model, GQA and a non-default rope_theta that the config must carry
    ours = Transformer(ModelArgs(**PARAMS, rope_theta=500000.0, max_seq_len=64)).eval()
    save_model(ours, tmp_path / "out", layout="hf", max_shard_size=max_shard_size)
    assert (tmp_path / "out" / "model.safetensors.index.json").exists() == (max_shard_size < 10**6)
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        err = (hf(TOKENS).logits - logits(ours)).abs().max().item()
    print(f"HF export -> transformers: max |logits diff| = {err:.2e}")
    assert err < 1e-4
    assert (logits(load_model(tmp_path / "out", dtype=torch.float32)) - logits(ours)).abs().max() < 1e-5


def test_meta_export_round_trip_and_tokenizer_copy(tmp_path, hf):
    sd = {k: (v[:128] if k in ("tok_embeddings.weight", "output.weight") else v) for k, v in meta_state_dict(hf).items()}
    ours = load_model(write_meta(tmp_path / "in", sd), dtype=torch.float32)
    tok = train_sentencepiece(tmp_path / "tok", vocab_size=100, byte_fallback=False)  # 100 pieces + 2 added tokens: fits 128 rows
    (tok.parent / "added_tokens.json").write_text(json.dumps({"<|im_start|>": 100, "<|im_end|>": 101}))
    save_model(ours, tmp_path / "out", layout="meta", tokenizer=tok)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["added_tokens.json", "consolidated.00.pth", "params.json",
                                                     "tokenizer.model"]
    params = json.loads((out / "params.json").read_text())
    assert set(params) <= {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                           "ffn_dim_multiplier", "norm_eps", "rope_theta"}  # Meta's loader takes exactly these
    assert torch.equal(logits(load_model(out, dtype=torch.float32), TOKENS % 128), logits(ours, TOKENS % 128))
    assert find_tokenizer(out) == out / "tokenizer.model"


def test_save_overwrites_atomically(tmp_path, hf, monkeypatch):
    ours = load_model(write_meta(tmp_path / "in", meta_state_dict(hf)), dtype=torch.float32)
    save_model(ours, tmp_path / "out", layout="meta")
    before = (tmp_path / "out" / "consolidated.00.pth").read_bytes()

    def crash(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(E.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_model(ours, tmp_path / "out", layout="meta")
    assert (tmp_path / "out" / "consolidated.00.pth").read_bytes() == before  # the old folder is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]  # no temporary folder left behind


class FakeQuantLinear(nn.Module):
    """Stands in for quant.NF4Linear: int8 codes and a per-row scale, no .weight, a dequantize() method."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.scale = w.abs().amax(1, keepdim=True) / 127
        self.register_buffer("codes", torch.round(w / self.scale).to(torch.int8))

    def dequantize(self) -> torch.Tensor:
        return self.codes.float() * self.scale

    def forward(self, x):
        return x @ self.dequantize().T


def test_save_dequantizes_modules_that_can(tmp_path, hf):
    ours = load_model(write_meta(tmp_path / "in", meta_state_dict(hf)), dtype=torch.float32)
    ours.layers[1].feed_forward.w2 = FakeQuantLinear(ours.layers[1].feed_forward.w2.weight.detach())
    want = logits(ours)
    save_model(ours, tmp_path / "out", layout="hf")
    back = load_model(tmp_path / "out", dtype=torch.float32)
    assert torch.equal(back.layers[1].feed_forward.w2.weight, ours.layers[1].feed_forward.w2.dequantize())
    assert (logits(back) - want).abs().max() < 1e-5
    ours.layers[0].attention.wq = nn.Sequential(ours.layers[0].attention.wq)  # e.g. an unmerged wrapper
    with pytest.raises(ValueError, match="merge LoRA"):
        save_model(ours, tmp_path / "bad", layout="meta")
    assert not (tmp_path / "bad").exists()


# ---- the streaming hook


class TransposedLinear(nn.Module):
    """A custom replacement for nn.Linear, as quant's NF4Linear would be."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.wt = nn.Parameter(w.T.contiguous())

    def forward(self, x):
        return x @ self.wt


def test_hook_sees_every_tensor_once_and_can_replace_modules(tmp_path, hf, ref_logits):
    folder = write_meta(tmp_path / "meta", meta_state_dict(hf), n_shards=2)
    seen = []

    def hook(name, t):
        seen.append((name, t.dtype, tuple(t.shape)))
        if name.endswith(("attention.wv.weight", "feed_forward.w2.weight")):
            return TransposedLinear(t)
        return t

    model = load_model(folder, dtype=torch.float32, hook=hook)
    expected = {n: tuple(p.shape) for n, p in Transformer(ModelArgs(**PARAMS)).named_parameters()}
    assert sorted(n for n, _, _ in seen) == sorted(expected)  # each once, Meta names, merged shapes
    assert all(dtype == torch.float32 and shape == expected[n] for n, dtype, shape in seen)
    assert isinstance(model.layers[1].attention.wv, TransposedLinear)
    assert isinstance(model.layers[0].feed_forward.w2, TransposedLinear)
    assert (logits(model) - ref_logits).abs().max().item() < 1e-4


# ---- peak memory while loading

RSS_SCRIPT = r"""
import json, sys, torch
from llama import load_model

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

big, small, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
load_model(small, dtype=dtype)  # warm up: one-time costs (code pages, thread pools) are not the model's
open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark so VmHWM measures this load alone
base = status("VmHWM")
model = load_model(big, dtype=dtype, device="cpu")
size = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"base": base, "peak": status("VmHWM"), "size": size}))
"""


@pytest.mark.slow
def test_peak_memory_while_loading(tmp_path, hf):
    """A ~220 MB fp32 checkpoint (2 Meta shards; 3 HF shards), loaded as fp32 and as bf16: the peak resident
    memory the load adds is at most 1.2x the loaded model (no second copy, no full-size temporaries)."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to measure peak RSS")
    args = ModelArgs(dim=512, n_layers=16, n_heads=8, n_kv_heads=4, vocab_size=8192, multiple_of=256)
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in Transformer(args).named_parameters()}
    sd = {n: torch.empty(s).normal_(0, 0.02) for n, s in shapes.items()}
    big = tmp_path / "big"
    big.mkdir()
    for i, shard in enumerate(split_like_meta(sd, 2)):
        torch.save(shard, big / f"consolidated.{i:02d}.pth")
    (big / "params.json").write_text(json.dumps(args.__dict__))
    big_hf = tmp_path / "big_hf"  # the same weights in HF layout, 3 safetensors shards
    save_model(load_model(big, dtype=torch.float32), big_hf, layout="hf", max_shard_size=100 * 2**20)
    del sd
    small = write_meta(tmp_path / "small", meta_state_dict(hf), 2)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ratios = {}
    for folder, dtype in ((big, "float32"), (big, "bfloat16"), (big_hf, "bfloat16")):
        r = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(folder), str(small), dtype], capture_output=True,
                           text=True, env=env, timeout=120)
        assert r.returncode == 0, r.stderr
        m = json.loads(r.stdout.strip().splitlines()[-1])
        ratios[f"{folder.name} -> {dtype}"] = round((m["peak"] - m["base"]) / m["size"], 3)
    print(f"peak RSS added while loading / loaded model size: {ratios}")
    assert all(r < 1.2 for r in ratios.values()), ratios


# ---- errors


def test_errors_name_the_problem(tmp_path, hf):
    sd = meta_state_dict(hf)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither params.json"):
        load_model(tmp_path / "empty")

    bad = write_meta(tmp_path / "nokey", sd)
    (bad / "params.json").write_text(json.dumps({"dim": DIM, "n_layers": LAYERS}))
    with pytest.raises(CheckpointError, match=r"params.json: missing required key\(s\) \['n_heads'\]"):
        load_model(bad)

    bad = write_meta(tmp_path / "shape", sd, multiple_of=256)  # FFN hidden 256, the weights have 192
    with pytest.raises(CheckpointError, match=r"layers.0.feed_forward.w1.weight has shape \(192, 64\).*\(256, 64\)"):
        load_model(bad)

    bad = write_meta(tmp_path / "trunc", sd, n_shards=2)
    f = bad / "consolidated.01.pth"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="consolidated.01.pth: cannot be read"):
        load_model(bad)

    bad = write_meta(tmp_path / "gap", sd, n_shards=2)
    (bad / "consolidated.01.pth").rename(bad / "consolidated.02.pth")
    with pytest.raises(CheckpointError, match="shard files"):
        load_model(bad)

    bad = write_meta(tmp_path / "other", sd, n_shards=2)
    torch.save({"tok_embeddings.weight": torch.zeros(VOCAB, 32)}, bad / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match="consolidated.01.pth: holds different tensors"):
        load_model(bad)

    hf.save_pretrained(tmp_path / "hf_nohead")
    from safetensors.torch import load_file, save_file
    w = load_file(tmp_path / "hf_nohead" / "model.safetensors")
    del w["lm_head.weight"]
    save_file(w, tmp_path / "hf_nohead" / "model.safetensors")
    with pytest.raises(CheckpointError, match="no lm_head.weight"):
        load_model(tmp_path / "hf_nohead")


def test_tokenizer_must_fit_the_embedding(tmp_path, hf):
    sd = meta_state_dict(hf)
    tok = train_sentencepiece(tmp_path / "parent", vocab_size=100, byte_fallback=False)  # Meta's layout: tokenizer in the parent
    folder = write_meta(tmp_path / "parent" / "llama-tiny", sd)  # 256 rows for 100 tokens
    assert find_tokenizer(folder) == tok
    with pytest.raises(CheckpointError, match=r"tokenizer.model .*has 100 tokens.* 256 embedding rows"):
        load_model(folder)
    # 100 tokens + 28 added ones = 128; or 100 padded up to 128 rows: both fine
    small = {k: (v[:128] if k in ("tok_embeddings.weight", "output.weight") else v) for k, v in sd.items()}
    folder = write_meta(tmp_path / "parent" / "llama-128", small)
    assert load_model(folder, dtype=torch.float32).args.vocab_size == 128
    (tok.parent / "added_tokens.json").write_text(json.dumps({f"<|extra_{i}|>": 100 + i for i in range(29)}))
    with pytest.raises(CheckpointError, match=r"has 129 tokens \(29 from added_tokens.json\)"):  # 129 > 128 rows
        load_model(folder)
    # ids must follow the SentencePiece vocabulary (the Tokenizer's rule): id 200 after 100 pieces is malformed
    (tok.parent / "added_tokens.json").write_text(json.dumps({"<|im_start|>": 200}))
    with pytest.raises(CheckpointError, match=r"added_tokens.json: the ids of the added tokens must be 100"):
        load_model(folder)
