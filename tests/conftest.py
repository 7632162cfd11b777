"""Shared test setup.

Triton reads TRITON_INTERPRET when a kernel is decorated, so it must be set before anything imports
quant.triton_nf4: on a machine without CUDA the kernels then run in Triton's CPU interpreter.
"""
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` (tests/test_gpu.py) need a CUDA GPU: without one they are skipped, with the reason."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


ROOT = Path(__file__).resolve().parent.parent
LLAMA2_TOKENIZER = Path(os.environ.get("LLAMA2_TOKENIZER", ROOT.parent / "shared" / "fixtures" / "llama2-tokenizer.model"))


@pytest.fixture
def llama2_tokenizer_path() -> Path:
    """Meta's real Llama 2 tokenizer; tests that need the true vocabulary skip when it is absent."""
    if not LLAMA2_TOKENIZER.exists():
        pytest.skip(f"Meta's Llama 2 tokenizer not found at {LLAMA2_TOKENIZER} (set LLAMA2_TOKENIZER)")
    return LLAMA2_TOKENIZER

DEMO_TOKENIZER = ROOT / "demo" / "tiny-llama" / "tokenizer.model"


@pytest.fixture(scope="session")
def tiny_train_ckpt(tmp_path_factory) -> Path:
    """A random tiny Llama (GQA) in Meta layout with the demo's tokenizer, and `data.jsonl` (20 chats) beside
    it: what train.py tests run on."""
    import json

    from llama import ModelArgs, Tokenizer, Transformer, save_model
    d = tmp_path_factory.mktemp("tiny_ckpt")
    torch.manual_seed(0)
    vocab = Tokenizer(str(DEMO_TOKENIZER)).n_words
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, multiple_of=16,
                                  max_seq_len=128))
    save_model(model, d, layout="meta", tokenizer=DEMO_TOKENIZER)
    rows = [{"messages": [{"role": "user", "content": f"What is the opposite of {a}?"},
                          {"role": "assistant", "content": f"The opposite of {a} is {b}."}]}
            for a, b in [("hot", "cold"), ("up", "down"), ("big", "small"), ("fast", "slow"), ("wet", "dry")] * 4]
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d
