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

ROOT = Path(__file__).resolve().parent.parent
LLAMA2_TOKENIZER = Path(os.environ.get("LLAMA2_TOKENIZER", ROOT.parent / "shared" / "fixtures" / "llama2-tokenizer.model"))


@pytest.fixture
def llama2_tokenizer_path() -> Path:
    """Meta's real Llama 2 tokenizer; tests that need the true vocabulary skip when it is absent."""
    if not LLAMA2_TOKENIZER.exists():
        pytest.skip(f"Meta's Llama 2 tokenizer not found at {LLAMA2_TOKENIZER} (set LLAMA2_TOKENIZER)")
    return LLAMA2_TOKENIZER
