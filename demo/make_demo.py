"""Build the bundled demo: a tiny Llama 2 (Meta layout, own SentencePiece tokenizer) and its datasets.

    python demo/make_demo.py          # rewrites demo/tiny-llama/ and demo/data/ (a few minutes on 2 cores)

What the demo shows. The tiny base model is pretrained here on plain sentences stating word
opposites ("the opposite of hot is cold."), in several phrasings, for every pair. It knows the facts
but not the chat format: asked "[INST] What is the opposite of hot? [/INST]" it rambles. Fine-tuning
(`python train.py`, QLoRA) teaches it to answer in one fixed reply format, using pairs from
`train.jsonl` only; `heldout.jsonl` asks about pairs it never saw in chat form, so an exact-match
score there measures the format being learned and the base's own knowledge being used, not recall
of fine-tuning answers. Some training dialogs hold two exchanges about different words, so the
fine-tuned model answers a conversation's latest question rather than repeating its first answer.
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from llama import ModelArgs, Transformer, save_model  # noqa: E402

PAIRS = """hot cold|big small|up down|fast slow|happy sad|light dark|open closed|early late|full empty
hard soft|high low|young old|rich poor|strong weak|wet dry|thick thin|loud quiet|clean dirty|near far
long short|heavy light|left right|first last|inside outside|cheap expensive|deep shallow|wide narrow
true false|win lose|push pull|buy sell|give take|friend enemy|day night|black white|north south|east west
sweet sour|safe dangerous|simple complex|ancient modern|brave afraid|calm angry|laugh cry|smooth rough
sharp dull|tight loose|awake asleep|alive dead|begin end|before after|above below|always never|all none
arrive leave|accept refuse|add subtract|asleep awake|attack defend|borrow lend|bottom top|break fix
come go|cool warm|enter exit|fat lean|find lose|forget remember|front back|gentle harsh
guilty innocent|hello goodbye|here there|import export|in out|inner outer|join split|kind cruel
lazy busy|less more|love hate|major minor|male female|maximum minimum|noisy silent
odd even|on off|past future|plus minus|polite rude|question answer|raise lower|rare common|real fake
rise fall|rural urban|shout whisper|sink float|spend save|stand sit|start finish|sunny cloudy
thin wide|tired rested|under over|vertical horizontal|visible hidden|wild tame|wise foolish|yes no"""

PRETRAIN_FORMS = ["the opposite of {a} is {b}.", "{b} is the opposite of {a}.", "what is the opposite of {a}? {b}.",
                  "{a} and {b} are opposites, the opposite of {a} is {b}.",
                  "is {b} the opposite of {a}? yes, the opposite of {a} is {b}."]
QUESTIONS = ["What is the opposite of {a}?", "Tell me the opposite of {a}.", "opposite of {a}?"]
ANSWER = "It is {b}."


def pairs() -> list[tuple[str, str]]:
    seen, out = set(), []
    for item in PAIRS.replace("\n", "|").split("|"):
        a, b = item.split()
        if a in seen or b in seen:  # each word has one opposite, so every question has one answer
            continue
        seen.update((a, b))
        out.append((a, b))
    return out


def dialog(*exchanges: tuple[str, str, str]) -> dict:
    """(question form, word, opposite) per exchange -> a chat row."""
    return {"messages": [m for q, a, b in exchanges for m in (
        {"role": "user", "content": q.format(a=a)}, {"role": "assistant", "content": ANSWER.format(a=a, b=b)})]}


def write_data(rng: random.Random, out: Path, n_heldout: int = 20) -> tuple[list[str], list[tuple[str, str]]]:
    ps = pairs()
    rng.shuffle(ps)
    held, train = ps[:n_heldout], ps[n_heldout:]
    directed = lambda group: [(a, b) for a, b in group] + [(b, a) for a, b in group]  # noqa: E731
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.jsonl", "w") as f:
        for a, b in directed(train):
            for q in QUESTIONS[:2]:
                f.write(json.dumps(dialog((q, a, b))) + "\n")
        # The third question about each pair is asked inside a dialog of two exchanges about two pairs (in a
        # random phrasing): its second answer depends on its second question only. The facts, the number of
        # questions and (nearly) the tokens are those of three single exchanges per pair.
        order = directed(train)
        rng.shuffle(order)
        for (a, b), (c, d) in zip(order[::2], order[1::2]):
            f.write(json.dumps(dialog((rng.choice(QUESTIONS), a, b), (rng.choice(QUESTIONS), c, d))) + "\n")
    with open(out / "heldout.jsonl", "w") as f:
        for a, b in directed(held):
            f.write(json.dumps(dialog((QUESTIONS[0], a, b))) + "\n")
    text = [form.format(a=a, b=b) for a, b in directed(ps) for form in PRETRAIN_FORMS]
    return text, directed(held)


def train_tokenizer(text: list[str], out: Path, vocab_size: int = 1024) -> None:
    """A small BPE SentencePiece model with Llama 2's settings (byte fallback, split digits, unk 0,
    bos 1, eos 2, no pad), trained on the pretraining text plus the chat templates' markers. The vocabulary
    is large enough that every word of the task is one token, so copying a word is one step."""
    import sentencepiece as spm
    markers = ["[INST] <<SYS>>\nYou are helpful.\n<</SYS>>\n\n [/INST]", "### User: ### Assistant:",
               "<|user|>\n<|assistant|>\n<|system|>\n", "Below is an instruction that describes a task. "
               "Write a response that appropriately completes the request. ### Instruction: ### Input: ### Response:"]
    corpus = "\n".join(text + markers * 20 + [ANSWER.format(a=a, b=b) for a, b in pairs()] + [q.format(a="x") for q in QUESTIONS] * 20)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus.splitlines()), model_prefix=str(out / "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, split_digits=True, character_coverage=1.0, unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, add_dummy_prefix=True, normalization_rule_name="identity", num_threads=2,
        minloglevel=2)
    (out / "tokenizer.vocab").unlink()


def pretrain(text: list[str], tok_path: Path, steps: int, seed: int) -> Transformer:
    sys.path.insert(0, str(ROOT.parent / "benchmarks"))
    from llama import Tokenizer
    from parity import pack  # the product's packing of samples held in memory (training reads them from disk)
    tok = Tokenizer(str(tok_path))
    samples = [(tok.encode(t, bos=True, eos=True), [True] * len(tok.encode(t, bos=True, eos=True))) for t in text]
    args = ModelArgs(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=tok.n_words, multiple_of=32,
                     max_seq_len=256)
    torch.manual_seed(seed)
    model = Transformer(args)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0, betas=(0.9, 0.98))
    rng = random.Random(seed)
    for step in range(steps):
        if step % 50 == 0:  # re-pack with a new order so documents meet new neighbours
            rng.shuffle(samples)
            rows = pack(samples, 128, tok.eos_id)
            order = torch.randperm(len(rows["tokens"]))
        idx = order[(step % 50) * 16 % len(order):][:16]
        lr = 3e-3 * min(1.0, (step + 1) / 50) * 0.5 * (1 + torch.cos(torch.tensor(step / steps * 3.14159)).item())
        for g in opt.param_groups:
            g["lr"] = lr
        labels = rows["labels"][idx]
        loss = model(rows["tokens"][idx], rows["doc_ids"][idx], labels=labels) / (labels != -100).sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            print(f"pretrain step {step + 1}/{steps} loss {loss.item():.4f}", flush=True)
    return model


@torch.no_grad()
def fact_recall(model: Transformer, tok_path: Path, facts: list[tuple[str, str]]) -> float:
    """Share of held-out facts the base completes correctly in its pretraining phrasing (greedy)."""
    from llama import Tokenizer
    from llama.generate import generate
    tok = Tokenizer(str(tok_path))
    prompts = [tok.encode(f"the opposite of {a} is", bos=True, eos=False) for a, _ in facts]
    outs = generate(model, prompts, 8, stop_ids=[tok.eos_id])
    return sum(tok.decode(o).strip().startswith(b + ".") for o, (_, b) in zip(outs, facts)) / len(facts)


def main(steps: int = 1500, seed: int = 0) -> None:
    rng = random.Random(seed)
    ckpt, data = ROOT / "tiny-llama", ROOT / "data"
    ckpt.mkdir(parents=True, exist_ok=True)
    text, held = write_data(rng, data)
    train_tokenizer(text, ckpt)
    model = pretrain(text, ckpt / "tokenizer.model", steps, seed)
    print(f"base model completes {fact_recall(model, ckpt / 'tokenizer.model', held):.0%} of held-out facts "
          "in its pretraining phrasing")
    model = model.to(torch.bfloat16)  # Meta ships bf16 weights
    tmp = ROOT / "tiny-llama.tmp"
    save_model(model, tmp, layout="meta", tokenizer=ckpt / "tokenizer.model")
    for f in tmp.iterdir():
        f.replace(ckpt / f.name)
    tmp.rmdir()
    print(f"wrote {ckpt} and {data}")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
