"""Shared test setup.

Triton reads TRITON_INTERPRET when a kernel is decorated, so it must be set before anything imports
quant.triton_nf4: on a machine without CUDA the kernels then run in Triton's CPU interpreter.

--dtype auto picks bf16 on CPUs that compute it natively and fp32 elsewhere (`llama.generate.auto_dtype`). The
tests must not depend on which CPU runs them, so LLAMA_CPU_BF16=0 pins auto to fp32 for the whole session
(subprocesses inherit it); the tests of bf16 training set it, or --dtype, themselves.
"""
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["LLAMA_CPU_BF16"] = "0"

import pytest  # noqa: E402

# Text for the tiny SentencePiece models tests train: the chat templates' markers included, so they are pieces.
SP_CORPUS = """The quick brown fox jumps over the lazy dog.
Hello! How can I help you today? I can answer questions about history and geography.
What is the capital of France? Paris is the capital of France. Two plus two is four.
Write a short poem about the sea. The sea is wide and deep and blue.
### Instruction: ### Response: ### Input: ### User: ### Assistant: ### System:
<|user|> <|assistant|> <|system|> [INST] [/INST] <<SYS>> <</SYS>>
Below is an instruction that describes a task. Write a response that appropriately completes the request.
"""


def train_sentencepiece(folder: Path, vocab_size: int = 400, byte_fallback: bool = True) -> Path:
    """folder/tokenizer.model: a tiny Llama-like SentencePiece BPE model (identity normalizer, byte fallback,
    bos 1, eos 2, no pad), trained on SP_CORPUS. Without byte_fallback (its 256 byte pieces) the vocabulary can
    be smaller than 259."""
    import io

    import sentencepiece as spm
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SP_CORPUS.splitlines() * 10), model_writer=buf, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=byte_fallback, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2, hard_vocab_limit=False)
    Path(folder).mkdir(parents=True, exist_ok=True)
    path = Path(folder) / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    return path


def sample_labels(ids: list[int], mask: list[bool]) -> list[int]:
    """Next-token targets of one sample: label[i] = ids[i+1] where token i+1 is trained on, else -100."""
    return [ids[i + 1] if mask[i + 1] else -100 for i in range(len(ids) - 1)] + [-100]


def hf_to_meta_state_dict(hf, n_heads: int, n_kv_heads: int) -> dict[str, torch.Tensor]:
    """A transformers Llama's weights in Meta's layout: Meta's names, wq/wk rows back in interleaved-pair order."""
    from llama.checkpoint import hf_to_meta_key, unpermute_from_hf
    sd = {}
    for k, v in hf.state_dict().items():
        name = hf_to_meta_key(k)
        if name.endswith("attention.wq.weight"):
            v = unpermute_from_hf(v, n_heads)
        elif name.endswith("attention.wk.weight"):
            v = unpermute_from_hf(v, n_kv_heads)
        sd[name] = v.clone()
    return sd


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


@pytest.fixture
def one_thread():
    """torch on one intra-op thread for the test: on a tiny model more threads only add synchronisation, which
    costs more than the work (many times more on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
