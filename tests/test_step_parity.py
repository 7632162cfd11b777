"""One whole training step against the Hugging Face stack: the same weights, samples, adapter and optimizer
inputs through ours (train.build_model, model(..., labels=)) and through transformers + peft + bitsandbytes
(LlamaForCausalLM, get_peft_model, Linear4bit), fp32 on CPU; step-0 loss and every trained gradient must agree.
`benchmarks/parity.py` is the one implementation: bench_train.py gates its timings on it, and tests/test_gpu.py
runs it in bf16 on a GPU.

The samples are multi-turn chats. Ours come from `encode_chat` (llama2 template); HF's side gets the same
dialogs rendered here, straight from Meta's `chat_completion`, with SentencePiece itself and the trained
tokens marked by hand (each reply and the eos closing it), and packs them with parity.hf_rows (its own rows,
position_ids and labels, nothing of ours). So a wrong training mask, label shift, position restart or
packing on our side moves our loss and gradients away from HF's."""
import sys
from pathlib import Path

import pytest
import sentencepiece as spm

from conftest import train_sentencepiece
from llama import Tokenizer
from llama.chat import encode_chat

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import parity  # noqa: E402

N_LAYERS = parity.SIZES["tiny"]["n_layers"]
SEQ_LEN = 128

DIALOGS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris is the capital of France."},
     {"role": "user", "content": "Two plus two?"}, {"role": "assistant", "content": "Two plus two is four."}],
    [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "How can I help you today?"}],
    [{"role": "user", "content": "Write a short poem about the sea."},
     {"role": "assistant", "content": "The sea is wide and deep and blue."},
     {"role": "user", "content": "And the fox?"},
     {"role": "assistant", "content": "The quick brown fox jumps over the lazy dog."},
     {"role": "user", "content": "Thanks."}, {"role": "assistant", "content": "I can answer questions."}],
    [{"role": "user", "content": "Is the dog lazy?"}, {"role": "assistant", "content": "The dog is lazy."}],
    [{"role": "system", "content": "You answer questions about history and geography."},
     {"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
]


def meta_chat_sample(sp: spm.SentencePieceProcessor, dialog: list[dict]) -> tuple[list[int], list[bool]]:
    """Meta's `chat_completion` for a dialog that ends with a reply: per exchange, BOS + sp.encode("[INST] {user}
    [/INST] {reply} ") + EOS (the system prompt folded into the first user turn). Trained: the tokens after
    "[/INST]", i.e. the reply and its EOS."""
    if dialog[0]["role"] == "system":
        first = f"<<SYS>>\n{dialog[0]['content']}\n<</SYS>>\n\n{dialog[1]['content']}"
        dialog = [{"role": "user", "content": first}] + dialog[2:]
    ids, mask = [], []
    for user, reply in zip(dialog[::2], dialog[1::2]):
        prompt = [sp.bos_id()] + sp.encode(f"[INST] {user['content'].strip()} [/INST]")
        full = [sp.bos_id()] + sp.encode(f"[INST] {user['content'].strip()} [/INST] {reply['content'].strip()} ")
        assert full[:len(prompt)] == prompt  # the reply starts a new piece ("▁...")
        ids += full + [sp.eos_id()]
        mask += [False] * len(prompt) + [True] * (len(full) - len(prompt) + 1)
    return ids, mask


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    """(ours, HF's): the dialogs through encode_chat, and through meta_chat_sample."""
    path = train_sentencepiece(tmp_path_factory.mktemp("sp"), vocab_size=400)  # ids < the tiny model's 512
    ours = [encode_chat(Tokenizer(path), d, "llama2") for d in DIALOGS]
    theirs = [meta_chat_sample(spm.SentencePieceProcessor(model_file=str(path)), d) for d in DIALOGS]
    assert [ids for ids, _ in ours] == [ids for ids, _ in theirs]  # the same tokens: only what trains may differ
    assert all(len(ids) <= SEQ_LEN for ids, _ in theirs) and sum(len(ids) for ids, _ in theirs) > SEQ_LEN
    return ours, theirs


@pytest.mark.parametrize("mode", ["full", "lora", "qlora"])
def test_step0_loss_and_gradients_match_transformers_peft_bitsandbytes(tmp_path, samples, mode):
    """parity.TOL["fp32"] (2e-5, 2e-5) against what was measured on CPU fp32: here |loss difference| up to
    9.5e-7 and gradient errors up to 7.9e-7 of their max (QLoRA included: at this width each q/k weight is one
    double-quantization group, so bitsandbytes' NF4 weights equal ours); on bench_train's synthetic batches up to
    4.8e-7 and 1.1e-6 at this size (every mode), 9.5e-7 and 2.2e-6 at its small size (seq 512 and 2048, LoRA
    and full)."""
    ours, theirs = samples
    r = parity.step0_parity(tmp_path, mode, "tiny", "cpu", "fp32", seq_len=SEQ_LEN, tokens_per_step=2 * SEQ_LEN,
                            samples=ours, hf_samples=theirs)
    print(f"{mode}: |loss ours - HF| {r['loss0_diff']:.1e}, gradient error {r['grad_rel_err']:.1e} ({r['grad_worst']})")
    assert not r["failures"], "; ".join(r["failures"])
    assert (r["tol_loss"], r["tol_grad"]) == parity.TOL["fp32"]
    if mode != "full":  # lora_A and lora_B of the seven projections in every layer
        assert r["n_grads"] == 2 * 7 * N_LAYERS
    assert r["n_grads"] > 0 and abs(r["loss0_ours"] - r["loss0_hf"]) <= parity.TOL["fp32"][0]


def test_hf_rows_by_hand():
    """parity.hf_rows against rows written out here: first fit in order (a new row when none has room),
    positions restarting at each sample and on the padded tail, labels = the token where trained and never a
    sample's first token."""
    samples = [([1, 5, 6, 2], [False, True, True, True]), ([1, 7], [True, True]), ([1, 8, 9], [False, False, True])]
    b = parity.hf_rows(samples, 6, 1, pad_id=0)
    assert b["hf_tokens"].tolist() == [[1, 5, 6, 2, 1, 7], [1, 8, 9, 0, 0, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2]]
    assert b["hf_labels"].tolist() == [[-100, 5, 6, 2, -100, 7], [-100, -100, 9, -100, -100, -100]]
