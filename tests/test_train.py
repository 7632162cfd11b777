"""train.py: data errors and filters, masks, packing isolation, learning in each mode, the demo (resume equality
is tested in test_reliability.py)."""
import copy
import json
import math
import re
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train
from conftest import sample_labels
from llama import ModelArgs, Tokenizer, Transformer, corpus
from llama.chat import encode_chat
from llama.data import DataError
from llama.generate import ChatOptions, resolve_device_dtype

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from parity import pack, split_of  # noqa: E402  (whole-corpus packing by llama.corpus, shared with the parity benchmark)

DEMO_TOK = train.DEMO / "tiny-llama" / "tokenizer.model"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(str(DEMO_TOK))


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hot?"},
                     {"role": "assistant", "content": "The opposite of hot is cold."}]}


# ---- data: errors, split, stats and filters (through the prepared corpus; formats: tests/test_data_formats.py)


def prepare(tmp_path, tok, data, **opts):
    """prepare_corpus into a fresh folder -> (stats, [(ids, mask)] train, [(ids, mask)] val)."""
    dest = tmp_path / f"c{len(list(tmp_path.glob('c*')))}"
    meta = corpus.prepare_corpus(data, tok, dest, corpus.DataOptions(**opts), workers=1)
    _, splits = corpus.open_corpus(dest)
    samples = {k: [(i.tolist(), m.astype(bool).tolist()) for i, m in map(v.sample, range(len(v)))]
               for k, v in splits.items()}
    return meta["stats"], samples["train"], samples.get("val", [])


@pytest.mark.parametrize("row, expect", [
    ('{"messages": [', "d.jsonl:2: not valid JSON"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "d.jsonl:2: message 0 has unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": "  "}]}, "d.jsonl:2: message 0 (user) has empty"),
    ({"messages": []}, "d.jsonl:2: the dialog is empty"),
    ({"conversations": [{"from": "robot", "value": "x"}]}, "d.jsonl:2: ShareGPT turn"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "d.jsonl:2: message 0 is 'assistant' where llama2 needs"),
])
def test_bad_rows_name_file_and_line(tmp_path, tok, row, expect):
    sharegpt = {"conversations": [{"from": "human", "value": "hot?"}, {"from": "gpt", "value": "cold"}]}
    p = write_jsonl(tmp_path / "d.jsonl", [sharegpt if "conversations" in row else CHAT, row])
    with pytest.raises(DataError, match=re.escape(expect)):
        prepare(tmp_path, tok, [str(p)], seq_len=128)
    assert [f.name for f in tmp_path.iterdir()] == ["d.jsonl"]  # nothing half-written


def test_cli_errors_exit_2_without_traceback(tmp_path, capsys):
    p = write_jsonl(tmp_path / "d.jsonl", ['{"messages": oops'])
    ckpt = ["--ckpt", str(train.DEMO / "tiny-llama")]
    rc = train.main(ckpt + ["--data", str(p), "--out", str(tmp_path / "o"), "--max-steps", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "d.jsonl:1: not valid JSON" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
    rc = train.main(ckpt + ["--data", str(p), "--out", str(tmp_path / "o"), "--prepare-data"])
    assert rc == 2 and "d.jsonl:1: not valid JSON" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_fraction_val_split_and_stats(tmp_path, tok):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a" * (i % 5 + 1)}]}
            for i in range(40)]
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    stats, tr, val = prepare(tmp_path, tok, [f"{p}:0.5"], val_split=0.25, max_val=3, seq_len=128)
    s = stats["files"][str(p)]
    assert s["rows"] == 20 and len(val) == 3 and len(tr) == 17 and s["accepted"] == 17 and s["val"] == 3
    assert s["min_tokens"] == min(len(x[0]) for x in tr + val) and s["max_tokens"] == max(len(x[0]) for x in tr + val)
    # every sample is one of the file's dialogs, none twice, none in both splits
    want = {tuple(encode_chat(tok, r["messages"], "llama2")[0]) for r in rows}
    got = [tuple(ids) for ids, _ in tr + val]
    assert set(got) <= want and len(set(got)) == 20


def test_overlong_and_min_assistant_tokens(tmp_path, tok):
    long = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
    p = write_jsonl(tmp_path / "d.jsonl", [CHAT, long])
    st, tr, _ = prepare(tmp_path, tok, [str(p)], seq_len=64, overlong="drop")
    assert len(tr) == 1 and st["files"][str(p)]["skipped"] == {"overlong": 1}
    # truncation keeps the prompt only: no assistant token survives, so the row is skipped, not trained on
    st, tr, _ = prepare(tmp_path, tok, [str(p)], seq_len=64, overlong="truncate")
    assert st["files"][str(p)]["skipped"] == {"too_few_assistant_tokens": 1}
    long2 = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 200}]}
    p2 = write_jsonl(tmp_path / "d2.jsonl", [long2])
    st, tr, _ = prepare(tmp_path, tok, [str(p2)], seq_len=64, overlong="truncate")
    ids, mask = encode_chat(tok, long2["messages"], "llama2")
    assert st["files"][str(p2)]["truncated"] == 1 and tr == [(ids[:64], mask[:64])]
    with pytest.raises(DataError, match="no training samples"):
        prepare(tmp_path, tok, [str(p)], seq_len=64, min_assistant_tokens=1000)


# ---- masks and packing


def test_labels_only_on_assistant_tokens(tok):
    ids, mask = encode_chat(tok, CHAT["messages"], "llama2")
    labels = sample_labels(ids, mask)
    trained = [ids[i + 1] for i, lab in enumerate(labels) if lab != -100]
    assert all(labels[i] == ids[i + 1] for i in range(len(ids) - 1) if labels[i] != -100)
    # what is trained on decodes to exactly the reply plus eos
    assert trained[-1] == tok.eos_id and tok.decode(trained[:-1]).strip() == "The opposite of hot is cold."


def test_pack_rows_are_full_and_complete():
    rng = torch.Generator().manual_seed(0)
    samples = [(torch.randint(3, 50, (int(n),), generator=rng).tolist(), [True] * int(n))
               for n in torch.randint(2, 60, (50,), generator=rng)]
    rows = pack(samples, 64, pad_id=0)
    assert rows["tokens"].shape[1] == 64
    # every sample appears exactly once as one contiguous document
    found = []
    for r in range(len(rows["tokens"])):
        for d in rows["doc_ids"][r].unique():
            sel = rows["doc_ids"][r] == d
            found.append(tuple(rows["tokens"][r][sel].tolist()))
    real = sorted(tuple(s[0]) for s in samples)
    assert sorted(f for f in found if f in set(real)) == real
    # no worse than a naive first-fit-decreasing written out here, and never below the lower bounds
    # (total tokens / row size; samples longer than half a row cannot share one)
    ffd = []
    for n in sorted((len(s[0]) for s in samples), reverse=True):
        j = next((j for j, room in enumerate(ffd) if room >= n), None)
        if j is None:
            ffd.append(64 - n)
        else:
            ffd[j] -= n
    lower = max(math.ceil(sum(len(s[0]) for s in samples) / 64), sum(len(s[0]) > 32 for s in samples))
    assert lower <= len(rows["tokens"]) <= len(ffd)


def tiny_model(vocab: int, seed: int = 0, multiple_of: int = 16) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab,
                                 multiple_of=multiple_of, max_seq_len=128))


def test_packed_loss_equals_token_weighted_loss_of_documents(tok):
    model = tiny_model(tok.n_words).eval()
    dialogs = [CHAT["messages"], [{"role": "user", "content": "hot?"}, {"role": "assistant", "content": "cold"}],
               [{"role": "user", "content": "What is the opposite of up?"},
                {"role": "assistant", "content": "The opposite of up is down."}]]
    samples = [encode_chat(tok, m, "llama2") for m in dialogs]
    rows = pack(samples, 128, tok.eos_id)
    assert len(rows["tokens"]) == 1  # all three share one row
    with torch.no_grad():
        packed = train.loss_sum(model, rows["tokens"], rows["labels"], rows["doc_ids"]).item()
        n = int((rows["labels"] != -100).sum())
        # reference: each document alone, plain full-vocab cross-entropy, no doc_ids
        total, count = 0.0, 0
        for ids, mask in samples:
            logits = model(torch.tensor([ids]))[0]
            labels = torch.tensor(sample_labels(ids, mask))
            total += F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum").item()
            count += int((labels != -100).sum())
    assert n == count
    assert abs(packed / n - total / count) < 1e-5


# ---- one optimizer step: gradient accumulation and data-parallel ranks against the whole batch at once


class _CaptureGrads(torch.optim.Optimizer):
    """Stands in for the optimizer: records the gradients it is stepped with and changes nothing."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.0})
        self.grads = None

    def step(self):
        self.grads = [p.grad.clone() for p in self.param_groups[0]["params"]]


class _Collective:
    """torch.distributed for `world` ranks running in threads: all_reduce leaves every rank's tensor holding the
    sum (ReduceOp.SUM, the default) or the mean (AVG) over the ranks, as gloo and NCCL do."""

    def __init__(self, world: int):
        self.world, self.bufs, self.rank = world, {}, {}
        self.barrier = threading.Barrier(world, timeout=60)

    def all_reduce(self, t, op=None, group=None, async_op=False):
        ops = torch.distributed.ReduceOp
        if op not in (None, ops.SUM, ops.AVG):
            raise NotImplementedError(op)
        self.bufs[self.rank[threading.get_ident()]] = t.clone()
        self.barrier.wait()
        total = sum(self.bufs[r] for r in range(self.world))
        self.barrier.wait()  # every rank has read the buffers before any rank writes its next one
        t.copy_(total / self.world if op == ops.AVG else total)


def _step_samples():
    """Eight samples that pack into four full rows of 16 (14+2, 12+4, 10+6, 9+7), with trained masks of
    different sizes, so micro-batches hold different numbers of trained tokens."""
    g = torch.Generator().manual_seed(0)
    samples = []
    for n in (10, 6, 12, 4, 9, 7, 14, 2):
        ids = torch.randint(3, 64, (n,), generator=g).tolist()
        start = int(torch.randint(1, n, (), generator=g)) if n > 2 else 1
        samples.append((ids, [i >= start for i in range(n)]))
    return samples


def _lora_model():
    from lora import apply_lora
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16,
                                  max_seq_len=16))
    apply_lora(model, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():  # B = 0 would give lora_A no gradient
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.1)
    return model


def _reference_step(model, samples):
    """Loss and LoRA gradients of the whole batch, each sample run alone through plain cross-entropy: the sum
    over every trained token of every sample, divided by their count."""
    model.zero_grad()
    total, count = 0.0, 0
    for ids, mask in samples:
        labels = torch.tensor(sample_labels(ids, mask))
        total = total + F.cross_entropy(model(torch.tensor([ids]))[0], labels, ignore_index=-100, reduction="sum")
        count += int((labels != -100).sum())
    (total / count).backward()
    return (total / count).item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def _train_step(model, samples, world: int, batch_size: int, grad_accum: int, monkeypatch):
    """train.train_step on `world` data-parallel ranks (threads, each with its own copy of the model): each
    rank's (loss, gradients the optimizer got)."""
    split = split_of(samples)
    rows = corpus.make_rows(split, 16)
    assert len(rows) == batch_size * grad_accum * world  # one step is exactly the whole batch
    cfg = train.TrainConfig(seq_len=16, batch_size=batch_size, grad_accum=grad_accum, max_grad_norm=0.0)
    data = train.Data(tokenizer=Tokenizer(str(DEMO_TOK)), new_tokens=[], folder=None, train=split, rows=rows,
                      val=None, val_rows=None, stats={})
    coll = _Collective(world)
    monkeypatch.setattr(torch.distributed, "all_reduce", coll.all_reduce)
    results, errors = [None] * world, []

    def rank_main(rank):
        coll.rank[threading.get_ident()] = rank
        try:
            m = copy.deepcopy(model)
            params = [p for p in m.parameters() if p.requires_grad]
            run = train.Run(model=m, params=params, optimizer=_CaptureGrads(params), device=torch.device("cpu"),
                            dtype=torch.float32, dist=train.Dist(rank=rank, world=world), out=None,
                            per_step=len(rows), steps_per_epoch=1, total=1)
            loss, _ = train.train_step(cfg, run, data, lr=1e-3)
            results[rank] = loss, run.optimizer.grads
        except BaseException as e:  # noqa: BLE001  the other ranks must not wait for this one
            errors.append(e)
            coll.barrier.abort()
    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def _assert_step_equals_reference(results, ref_loss, ref_grads):
    for loss, grads in results:
        assert abs(loss - ref_loss) <= 1e-5 * ref_loss
        assert len(grads) == len(ref_grads)
        for g, ref in zip(grads, ref_grads):
            assert (g - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("batch_size, grad_accum", [(1, 4), (2, 2), (4, 1)])
def test_train_step_loss_is_normalised_over_the_whole_batch(batch_size, grad_accum, monkeypatch):
    """Gradient accumulation changes nothing: the step's loss and gradients are those of the whole batch,
    normalised by all of its trained tokens (not averaged per micro-batch)."""
    model, samples = _lora_model(), _step_samples()
    ref_loss, ref_grads = _reference_step(copy.deepcopy(model), samples)
    _assert_step_equals_reference(_train_step(model, samples, 1, batch_size, grad_accum, monkeypatch),
                                  ref_loss, ref_grads)


def test_two_ranks_all_reduce_to_the_one_process_step(monkeypatch):
    """Two data-parallel ranks, each with half of the rows and two micro-batches: after the all-reduce of the
    adapters' gradients every rank holds the gradient one process computes on the whole batch (their sum: the
    loss is already normalised by the global batch's trained tokens, so a mean would halve it)."""
    model, samples = _lora_model(), _step_samples()
    ref_loss, ref_grads = _reference_step(copy.deepcopy(model), samples)
    _assert_step_equals_reference(_train_step(model, samples, 2, 1, 2, monkeypatch), ref_loss, ref_grads)


def _bf16_step_pair():
    """One LoRA step's loss and adapter gradients in fp32 and in bf16 on CPU, the bf16 one as train.py runs it
    there (the base's weights in bf16, the adapters fp32, no autocast: `train.autocast`): dim 256, 4 layers,
    4 rows of 128 tokens cut into 3-5 documents each, about 30% of the tokens untrained prompt."""
    from lora import apply_lora
    torch.manual_seed(0)
    base = Transformer(ModelArgs(dim=256, n_layers=4, n_heads=4, vocab_size=1000, max_seq_len=128))
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 1000, (4, 128), generator=g)
    cuts = [sorted(torch.randperm(127, generator=g)[:k].add(1).tolist()) for k in (2, 3, 4, 2)]
    doc_ids = torch.tensor(np.array([np.searchsorted(c, np.arange(128), side="right") for c in cuts]))
    labels = torch.roll(tokens, -1, 1)
    labels[torch.rand(4, 128, generator=g) < 0.3] = -100
    labels[torch.roll(doc_ids, -1, 1) != doc_ids] = -100  # no target across a document boundary (or past the row)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = copy.deepcopy(base).to(dtype)
        torch.manual_seed(2)
        apply_lora(model, r=8, alpha=16, dropout=0.0)
        with torch.no_grad():  # B = 0 would give lora_A no gradient
            for n, p in model.named_parameters():
                if n.endswith("lora_B"):
                    p.normal_(0, 0.02)
        with train.autocast(torch.device("cpu"), dtype):
            loss = train.loss_sum(model, tokens, labels, doc_ids) / int((labels != -100).sum())
        loss.backward()
        out[dtype] = loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return out[torch.float32], out[torch.bfloat16]


def test_bf16_step_matches_the_fp32_step():
    """A bf16 LoRA step on CPU (what --dtype auto runs on a CPU with native bf16) against the same step in fp32:
    the loss within 1e-4 relative and every adapter gradient within 3e-2 of its largest value. Measured on torch
    2.13: loss 9.1e-6 relative; gradient errors 1.4e-2 at worst, 9.7e-3 median (bf16 keeps 8 bits of mantissa,
    ~4e-3 per rounding, and the activations are rounded at every layer). The adapter gradients stay fp32, so
    the optimizer's update is not rounded to bf16."""
    (loss32, g32), (loss16, g16) = _bf16_step_pair()
    assert g32.keys() == g16.keys() and len(g32) == 4 * 7 * 2
    assert all(g.dtype == torch.float32 for g in g16.values())
    worst = max(((g16[n] - g32[n]).abs().max() / g32[n].abs().max()).item() for n in g32)
    print(f"|loss bf16 - fp32| / loss {abs(loss16 - loss32) / loss32:.1e}, worst gradient error {worst:.1e}")
    assert abs(loss16 - loss32) <= 1e-4 * loss32, (loss16, loss32)
    assert worst <= 3e-2


def test_auto_dtype_follows_the_cpu_then_the_checkpoint_size(tmp_path, monkeypatch):
    """--dtype auto on CPU: bf16 where the CPU computes bf16 natively (as torch's probes say, or LLAMA_CPU_BF16=1);
    elsewhere fp32 for the small demo model and bf16 for a checkpoint over 2 GiB (7B is 13.5 GB), where fp32 would
    double the unquantized embeddings, head and activations. An explicit --dtype always wins; CUDA is bf16."""
    from llama.generate import auto_dtype, cpu_bf16
    big = tmp_path / "big"
    big.mkdir()
    with open(big / "consolidated.00.pth", "wb") as f:  # sparse: only its size is read
        f.truncate(3 * 2**30)
    (big / "params.json").write_text("{}")
    demo = train.TrainConfig().ckpt
    cpu = torch.device("cpu")

    monkeypatch.setenv("LLAMA_CPU_BF16", "0")  # forced off
    assert resolve_device_dtype("cpu", "auto", demo)[1] == torch.float32
    assert auto_dtype(cpu, demo) == ("fp32", "this CPU has no native bf16, neither AVX512-BF16 nor AMX")
    assert resolve_device_dtype("cpu", "auto", big)[1] == torch.bfloat16
    assert resolve_device_dtype("cpu", "fp32", big)[1] == torch.float32
    assert resolve_device_dtype("cuda", "auto", demo) == (torch.device("cuda"), torch.bfloat16)  # resolving needs no GPU
    monkeypatch.setenv("LLAMA_CPU_BF16", "1")  # forced on
    assert resolve_device_dtype("cpu", "auto", demo)[1] == torch.bfloat16
    assert auto_dtype(cpu, demo) == ("bf16", "this CPU has native bf16, LLAMA_CPU_BF16=1")
    assert resolve_device_dtype("cpu", "fp32", demo)[1] == torch.float32

    # not forced: torch's probes decide, whatever this machine's CPU is
    monkeypatch.delenv("LLAMA_CPU_BF16")
    for avx512_bf16, amx, want in [(False, False, ""), (True, False, "AVX512-BF16"), (True, True, "AMX/AVX512-BF16")]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert cpu_bf16() == want
        assert resolve_device_dtype("cpu", "auto", demo)[1] == (torch.bfloat16 if want else torch.float32)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")  # a torch without the probe: no native bf16
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert cpu_bf16() == "" and resolve_device_dtype("cpu", "auto", demo)[1] == torch.float32


def test_chat_uses_main_argv_and_the_runs_template(tmp_path, tiny_train_ckpt, monkeypatch, capsys):
    """--chat hands the loaded model and llama.generate's chat flags to its chat loop; the template and the
    quantization are the adapter's run's unless main's own argv names them (sys.argv, here pytest's or a parent
    program's, is not looked at)."""
    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    (tmp_path / "run" / "run_config.json").write_text(json.dumps({"template": "tulu", "quant": "nf4"}))
    seen = []
    monkeypatch.setattr(train.lora, "load_adapter", lambda model, path: seen.append(("adapter", str(path))))
    monkeypatch.setattr(train, "chat_loop", lambda model, tok, template, opts: seen.append((
        template, model.args.dim, any(isinstance(m, train.quant.NF4Linear) for m in model.modules()), opts)))
    monkeypatch.setattr("sys.argv", ["train.py", "--template", "llama2"])
    base = ["--chat", "--ckpt", str(tiny_train_ckpt), "--adapter", str(adapter), "--dtype", "bf16"]
    assert train.main(base) == 0
    assert train.main(base + ["--template", "oasst", "--quant", "none", "--temperature", "0", "--system", "Hi.",
                              "--top-p", "0.5", "--max-new-tokens", "7", "--no-history"]) == 0
    assert train.main(base + ["--template=alpaca"]) == 0
    meta_defaults = ChatOptions(system=None, max_new_tokens=512, temperature=0.6, top_p=0.9, no_history=False)
    given = ChatOptions(system="Hi.", max_new_tokens=7, temperature=0.0, top_p=0.5, no_history=True)
    assert seen == [("adapter", str(adapter)), ("tulu", 64, True, meta_defaults)] + [
        ("adapter", str(adapter)), ("oasst", 64, False, given)] + [
        ("adapter", str(adapter)), ("alpaca", 64, True, meta_defaults)]
    # a template whose special tokens the tokenizer lacks: llama.generate's check, as a clear error (exit 2)
    assert train.main(["--chat", "--ckpt", str(tiny_train_ckpt), "--template", "chatml"]) == 2
    assert "error: --template chatml needs the special tokens" in capsys.readouterr().err


# ---- learning in each mode


@pytest.fixture
def tiny_ckpt(tiny_train_ckpt):
    return tiny_train_ckpt


def run(tmp_path, ckpt, *extra):
    out = tmp_path / "out"
    data = [] if "--data" in extra else ["--data", str(ckpt / "data.jsonl")]  # a repeated --data would add files
    args = ["--ckpt", str(ckpt), *data, "--out", str(out), "--seq-len", "64",
            "--batch-size", "4", "--grad-accum", "2", "--lr", "3e-3", "--warmup-ratio", "0", *extra]
    assert train.main(args) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], out


ONE_CHAT = [{"role": "user", "content": "What is the opposite of hot?"},
            {"role": "assistant", "content": "The opposite of hot is cold."}]


def hf_step0_loss(ckpt, tmp_path, quantized: bool) -> float:
    """The mean next-token loss over ONE_CHAT's reply + eos under the untrained model, computed without our
    training code: transformers' LlamaForCausalLM (bitsandbytes NF4, double quant, for QLoRA) on the checkpoint
    in HF layout, the dialog rendered as Meta's chat_completion does with SentencePiece itself."""
    import sentencepiece as spm
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    from llama import load_model, save_model
    save_model(load_model(ckpt, dtype=torch.float32), tmp_path / "hf", layout="hf")
    kw = dict(quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                     bnb_4bit_use_double_quant=True,
                                                     bnb_4bit_compute_dtype=torch.float32)) if quantized else {}
    # train mode (Llama has no dropout): in eval mode bitsandbytes repacks NF4 weights for a CPU kernel that
    # needs the FFN width to be a multiple of its block
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32, device_map="cpu", **kw).train()
    sp = spm.SentencePieceProcessor(model_file=str(DEMO_TOK))
    user, reply = (m["content"] for m in ONE_CHAT)
    prompt = [sp.bos_id()] + sp.encode(f"[INST] {user} [/INST]")
    ids = [sp.bos_id()] + sp.encode(f"[INST] {user} [/INST] {reply} ") + [sp.eos_id()]
    assert ids[:len(prompt)] == prompt
    labels = [-100] * len(prompt) + ids[len(prompt):]  # HF shifts: logits[i] is scored against labels[i + 1]
    with torch.no_grad():
        return hf(torch.tensor([ids]), labels=torch.tensor([labels])).loss.item()


@pytest.mark.slow
@pytest.mark.parametrize("mode", [["--full"], ["--quant", "none", "--lr", "1e-2"], ["--quant", "nf4", "--lr", "1e-2"]],
                         ids=["full", "lora", "qlora"])
def test_loss_decreases(tmp_path, mode, capsys):
    """Every row of the data is the same dialog, so whichever packed rows a step draws, its loss is that
    dialog's mean loss over its trained tokens (documents are isolated, positions restart): step 0's logged
    loss (before any update; LoRA's B = 0) must equal the untrained model's loss computed by transformers
    (hf_step0_loss), and training must then drive it down."""
    from llama import save_model
    # tiny_ckpt's shapes with an FFN width of 192, a multiple of 64: bitsandbytes' CPU kernel (the QLoRA
    # reference) is wrong when rows split its 64-value blocks (tests/test_nf4.py)
    ckpt = tmp_path / "ckpt"
    save_model(tiny_model(Tokenizer(str(DEMO_TOK)).n_words, multiple_of=64), ckpt, layout="meta", tokenizer=DEMO_TOK)
    data = write_jsonl(tmp_path / "one.jsonl", [{"messages": ONE_CHAT}] * 16)
    metrics, out = run(tmp_path, ckpt, "--data", str(data), "--max-steps", "16", "--lora-dropout", "0",
                       "--schedule", "constant", "--max-grad-norm", "1", *mode)
    # loading shows progress (minutes for 7B on a CPU): in a log, the first tensor, then a line at most every 10 s
    # (llama.files.Progress), the last one at 100%; never a line per tensor
    lines = re.findall(r"loading weights: (\d+)/(\d+) tensors \((\d+)%\)", capsys.readouterr().out)
    n_layers = 2  # tiny_train_ckpt: 9 tensors per layer + embeddings, final norm, head
    n = str(9 * n_layers + 3)
    assert lines[-1] == (n, n, "100") and len(lines) < int(n)
    want = hf_step0_loss(ckpt, tmp_path, quantized="nf4" in mode)
    assert abs(metrics[0]["loss"] - want) < 1e-4, (metrics[0]["loss"], want)
    assert metrics[-1]["loss"] < 0.5 * metrics[0]["loss"]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_mb"} <= set(metrics[0])
    assert (out / ("model" if "--full" in mode else "adapter")).exists()


@pytest.mark.parametrize("quant, layout", [("none", "hf"), ("nf4", "hf"), ("nf4", "meta")])
def test_merge_output_reproduces_the_trained_model(tmp_path, tiny_ckpt, monkeypatch, quant, layout, one_thread):
    """--merge: OUT/merged, loaded by llama.load_model (and for the HF layout by transformers), gives the logits
    the trained model (base, NF4 for QLoRA, + adapters) gave in memory just before it was merged."""
    from transformers import LlamaForCausalLM

    from llama import load_model
    tokens = torch.randint(0, Tokenizer(str(DEMO_TOK)).n_words, (2, 20), generator=torch.Generator().manual_seed(0))
    seen = {}
    real_merge = train.merge_model

    def record_then_merge(cfg, model, *args):
        model.eval()
        with torch.no_grad():
            seen["logits"] = model(tokens)
        return real_merge(cfg, model, *args)

    monkeypatch.setattr(train, "merge_model", record_then_merge)
    _, out = run(tmp_path, tiny_ckpt, "--max-steps", "3", "--lr", "1e-2", "--quant", quant, "--merge",
                 "--merge-layout", layout)
    want = seen["logits"]
    with torch.no_grad():
        base = load_model(tiny_ckpt, dtype=torch.float32)(tokens)
        assert (want - base).abs().max() > 1e-2  # training changed the model
        ours = load_model(out / "merged", dtype=torch.float32)(tokens)
        assert (ours - want).abs().max().item() < 1e-4
        if layout == "hf":
            hf = LlamaForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
            assert (hf(tokens).logits - want).abs().max().item() < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("cpu_bf16, dtype", [("0", "fp32"), ("1", "bf16")])
def test_demo_learns_the_reply_format(tmp_path, monkeypatch, cpu_bf16, dtype):
    """The README's first command, with fewer epochs: QLoRA on the bundled tiny Llama takes held-out
    exact match from ~0 to most of the prompts, in the dtype --dtype auto picks on a CPU without native bf16
    (fp32) and on one with it (bf16)."""
    monkeypatch.setenv("LLAMA_CPU_BF16", cpu_bf16)
    out = tmp_path / "demo"
    assert train.main(train.DEMO_FLAGS + ["--out", str(out), "--epochs", "12"]) == 0
    assert json.loads((out / "run_config.json").read_text())["dtype"] == dtype
    result = json.loads((out / "result.json").read_text())
    assert result["exact_match_before"] <= 0.1
    assert result["exact_match_after"] >= 0.6
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    # talking to the result: base + adapter, quantized, in the run's template (read from run_config.json); the
    # second answer is about the second question (the demo data has two-exchange dialogs), not a repeat
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "train.py", "--chat", "--ckpt", str(train.DEMO / "tiny-llama"), "--adapter",
                        str(out / "adapter"), "--quant", "nf4"],
                       input="What is the opposite of hot?\nWhat is the opposite of happy?\n\n",
                       cwd=train.ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "> It is cold.\n> It is sad.\n" in r.stdout, r.stdout + r.stderr


@pytest.mark.slow
def test_chatml_added_tokens_train_and_second_stage(tmp_path, tiny_ckpt):
    """ChatML on a base model: the two added tokens grow the embedding, the new rows train and are saved with
    the adapter; stage 2 starts from that adapter (--init-adapter) with LIMA dropout."""
    from safetensors.torch import load_file
    _, out1 = run(tmp_path / "s1", tiny_ckpt, "--template", "chatml", "--max-steps", "3", "--quant", "nf4")
    cfg = json.loads((out1 / "adapter" / "adapter_config.json").read_text())
    assert set(cfg["modules_to_save"]) >= {"embed_tokens", "lm_head"}
    weights = load_file(out1 / "adapter" / "adapter_model.safetensors")
    emb = next(v for k, v in weights.items() if "embed_tokens" in k)
    head = next(v for k, v in weights.items() if "lm_head" in k)
    tok = Tokenizer(str(out1 / "adapter" / "tokenizer.model"))
    assert tok.special_tokens == {"<|im_start|>": 1024, "<|im_end|>": 1025}
    assert emb.shape[0] % 128 == 0 and emb.shape[0] >= tok.n_words
    # the rows the added tokens got start as the mean of the base rows (resize_embeddings), and training moved
    # them (in the input embedding and in the head); an embedding row no input token uses gets no gradient,
    # so AdamW (no weight decay) leaves it exactly as it was: the base's rows, the mean for the padding rows
    from llama import load_model
    base = load_model(tiny_ckpt, dtype=torch.float32)
    for trained, start in ((emb, base.tok_embeddings.weight), (head, base.output.weight)):
        mean = start.mean(0)
        for i in (1024, 1025):
            assert (trained[i] - mean).abs().max() > 1e-3, i
    seen = set(np.load(out1 / "data" / "train" / "ids.npy").tolist()) | {tok.eos_id}  # eos also pads the rows
    assert {1024, 1025} <= seen
    unseen = [i for i in range(1024) if i not in seen]
    assert len(unseen) > 500 and torch.equal(emb[unseen], base.tok_embeddings.weight[unseen])
    assert torch.equal(emb[1026:], base.tok_embeddings.weight.mean(0).expand(emb.shape[0] - 1026, -1))
    assert not torch.equal(emb[sorted(seen - {1024, 1025})], base.tok_embeddings.weight[sorted(seen - {1024, 1025})])
    metrics, out2 = run(tmp_path / "s2", tiny_ckpt, "--template", "chatml", "--max-steps", "2", "--quant", "nf4",
                        "--init-adapter", str(out1 / "adapter"), "--lima-dropout", "0.25")
    # stage 2 starts where stage 1 ended: its first loss is below stage 1's first loss
    first1 = json.loads((out1 / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert metrics[0]["loss"] < first1
