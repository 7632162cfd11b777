"""The merge command (`train.py --merge --adapter DIR`) and the merge report, against independent references: the
in-run --merge's files byte for byte, an adapter written by PEFT itself and PeftModel's logits, transformers
loading the merged folder, bitsandbytes' own dequantize_4bit plus s * B @ A for an NF4 base, and the report's
perplexities, KL and agreement recomputed with transformers and PEFT; bad input is one error line."""
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import lora
import train
from llama import ModelArgs, Tokenizer, Transformer, load_model
from llama.chat import encode_chat
from llama.checkpoint import unpermute_from_hf

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

DEMO = train.DEMO / "tiny-llama"
TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """demo_run(quant, layout, template, *extra) -> OUT of two QLoRA/LoRA steps on the demo with --merge (cached)."""
    runs = {}

    def run(quant: str, layout: str, template: str, *extra: str):
        key = (quant, layout, template, *extra)
        if key not in runs:
            out = tmp_path_factory.mktemp("run") / "out"
            assert train.main(["--ckpt", str(DEMO), "--data", str(train.DEMO / "data" / "train.jsonl"), "--out",
                               str(out), "--quant", quant, "--template", template, "--seq-len", "128",
                               "--batch-size", "8", "--grad-accum", "1", "--max-steps", "2", "--lr", "1e-2",
                               "--merge", "--merge-layout", layout, *extra]) == 0
            runs[key] = out
        return runs[key]
    return run


def merge(adapter, out, *extra: str, ckpt=DEMO) -> int:
    return train.main(["--merge", "--ckpt", str(ckpt), "--adapter", str(adapter), "--out", str(out), *extra])


def files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ---- the command writes what the in-run --merge writes


@pytest.mark.parametrize("quant, layout, template, extra", [
    ("nf4", "meta", "chatml", ["--val-split", "0.1"]),
    ("none", "hf", "llama2", []),
    pytest.param("nf4", "hf", "chatml", [], marks=pytest.mark.slow),
    pytest.param("none", "meta", "chatml", [], marks=pytest.mark.slow),
])
def test_command_writes_the_in_run_merge_byte_for_byte(demo_run, tmp_path, capsys, quant, layout, template, extra):
    """Train two steps with --merge, then merge the saved adapter with the command: every file of the merged
    folder (weights, tokenizer files, template, generation config, merge_report.json) is the same bytes. The base
    is loaded as the run had it (NF4 or not, its dtype and template: OUT/run_config.json) with no flags for it."""
    out = demo_run(quant, layout, template, *extra)
    run_cfg = json.loads((out / "run_config.json").read_text())
    assert (run_cfg["quant"], run_cfg["dtype"]) == (quant, "fp32")  # resolved, not "auto"
    capsys.readouterr()
    assert merge(out / "adapter", tmp_path / "merged", "--merge-layout", layout) == 0
    printed = capsys.readouterr().out
    assert f"({'NF4' if quant == 'nf4' else 'fp32'} base, template {template})" in printed
    mine, theirs = files(tmp_path / "merged"), files(out / "merged")
    assert list(mine) == list(theirs) and "merge_report.json" in mine
    assert [n for n in mine if mine[n] != theirs[n]] == []
    report = json.loads(mine["merge_report.json"])
    assert report["base"] == ("nf4" if quant == "nf4" else "dense") and report["layout"] == layout
    assert ("dense_merge" in report) == (quant == "nf4")


def test_report_right_merge_near_zero_dense_merge_worse(demo_run):
    """NF4-trained: the merged model (dequantized NF4 + update) computes what the adapter on its NF4 base computed;
    the adapter merged into the original dense weights does not, by orders of magnitude. The adapter's perplexity
    on the val split is the run's own final eval perplexity (computed by evaluate())."""
    out = demo_run("nf4", "meta", "chatml", "--val-split", "0.1")
    report = json.loads((out / "merged" / "merge_report.json").read_text())
    right, wrong = report["merged"], report["dense_merge"]
    assert abs(right["kl"]) < 1e-9 and right["top1_agreement"] == 1.0
    assert math.isclose(right["ppl"], report["adapter_on_base"]["ppl"], rel_tol=1e-6)
    assert wrong["kl"] > 1e4 * max(right["kl"], 1e-15)
    assert wrong["top1_agreement"] < right["top1_agreement"]
    assert abs(math.log(wrong["ppl"] / right["ppl"])) > 1e-4
    stats = json.loads((out / "data_stats.json").read_text())
    assert report["sample"] == f"{stats['val_samples']} samples of the val split of the run's corpus"
    final = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert math.isclose(report["adapter_on_base"]["ppl"], final["eval_ppl"], rel_tol=1e-5)


def test_nf4_merge_is_bitsandbytes_dequant_plus_update(demo_run):
    """Each merged projection equals bitsandbytes' dequantize_4bit of the base's NF4 weight (as QLoRA quantizes it:
    blocksize 64, double quant) plus (alpha / r) * B @ A from adapter_model.safetensors; the added tokens' rows
    come from the adapter's modules_to_save."""
    import bitsandbytes.functional as bnbF
    out = demo_run("nf4", "meta", "chatml", "--val-split", "0.1")
    base = torch.load(DEMO / "consolidated.00.pth", weights_only=True)
    merged = torch.load(out / "merged" / "consolidated.00.pth", weights_only=True)
    ad = load_file(out / "adapter" / "adapter_model.safetensors")
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    args = json.loads((DEMO / "params.json").read_text())
    hf = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
          "w1": "mlp.gate_proj", "w2": "mlp.down_proj", "w3": "mlp.up_proj"}
    for layer in range(args["n_layers"]):
        for t in TARGETS:
            name = f"layers.{layer}.{'attention' if t in ('wq', 'wk', 'wv', 'wo') else 'feed_forward'}.{t}"
            w = base[name + ".weight"].float()
            # blocks run over the flattened weight: as a (1, n) weight, w2's K % 64 != 0 stays off bitsandbytes'
            # CPU kernel's wrong path (test_nf4.py records it)
            packed, state = bnbF.quantize_4bit(w.reshape(1, -1), blocksize=64, compress_statistics=True,
                                               quant_type="nf4")
            key = f"base_model.model.model.layers.{layer}.{hf[t]}"
            A, B = ad[key + ".lora_A.weight"], ad[key + ".lora_B.weight"]
            if t in ("wq", "wk"):  # the adapter's B rows are in HF's rotary order, the Meta checkpoint's are not
                B = unpermute_from_hf(B, args["n_heads"] if t == "wq" else args["n_kv_heads"])
            want = bnbF.dequantize_4bit(packed, state).view(w.shape) + cfg["lora_alpha"] / cfg["r"] * (B @ A)
            torch.testing.assert_close(merged[name + ".weight"], want, atol=1e-6, rtol=0)
    assert torch.equal(merged["tok_embeddings.weight"], ad["base_model.model.model.embed_tokens.weight"])
    assert torch.equal(merged["output.weight"], ad["base_model.model.lm_head.weight"])


# ---- an adapter written by PEFT itself, onto a Hugging Face base folder


def test_peft_adapter_onto_hf_base(tmp_path, capsys):
    """peft.get_peft_model on a tiny transformers Llama (random lora_B so it is not a no-op, lm_head trained in
    full), save_pretrained; merged by the command: transformers loads the folder and its logits are PeftModel's on
    the base. The report, on --report-data, agrees with the same numbers computed here from PeftModel (the
    reference) and the merged folder in transformers."""
    torch.manual_seed(0)
    vocab = Tokenizer(DEMO / "tokenizer.model").n_words
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=False, initializer_range=0.1)
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    transformers.LlamaForCausalLM(config).save_pretrained(base_dir)
    shutil.copy(DEMO / "tokenizer.model", base_dir)
    model = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(base_dir),
                                peft.LoraConfig(r=8, lora_alpha=16, target_modules=HF_TARGETS, modules_to_save=["lm_head"],
                                                task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(adapter_dir)

    dialogs = [[{"role": "user", "content": f"What is the opposite of {a}?"}, {"role": "assistant", "content": b}]
               for a, b in [("hot", "It is cold."), ("up", "It is down."), ("big", "It is small.")]]
    data = tmp_path / "sample.jsonl"
    data.write_text("".join(json.dumps({"messages": d}) + "\n" for d in dialogs))
    assert merge(adapter_dir, tmp_path / "merged", "--report-data", str(data), ckpt=base_dir) == 0
    assert "(fp32 base, template llama2)" in capsys.readouterr().out  # not ours: dense, as --quant auto says

    reference = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(base_dir),
                                               adapter_dir).eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    tokens = torch.randint(0, vocab, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = reference(tokens).logits
        assert (want - transformers.LlamaForCausalLM.from_pretrained(base_dir)(tokens).logits).abs().max() > 0.1
        torch.testing.assert_close(merged(tokens).logits, want, atol=1e-4, rtol=0)

    tok = Tokenizer(DEMO / "tokenizer.model")
    ref_lp, merged_lp, targets = [], [], []
    for d in dialogs:
        ids, mask = encode_chat(tok, d, "llama2")
        trained = torch.tensor(mask[1:])  # position i predicts token i + 1
        with torch.no_grad():
            ref_lp.append(F.log_softmax(reference(torch.tensor([ids])).logits[0, :-1][trained].double(), -1))
            merged_lp.append(F.log_softmax(merged(torch.tensor([ids])).logits[0, :-1][trained].double(), -1))
        targets.append(torch.tensor(ids[1:])[trained])
    ref_lp, merged_lp, targets = torch.cat(ref_lp), torch.cat(merged_lp), torch.cat(targets)
    report = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert report["sample"] == f"3 samples of the train split of {data}" and report["trained_tokens"] == len(targets)
    for key, lp in (("adapter_on_base", ref_lp), ("merged", merged_lp)):
        nll = -lp.gather(1, targets[:, None]).mean().item()
        assert math.isclose(report[key]["ppl"], math.exp(nll), rel_tol=1e-4)
    kl = F.kl_div(merged_lp, ref_lp, log_target=True, reduction="batchmean").item()
    assert abs(report["merged"]["kl"] - kl) < 1e-7 and report["merged"]["kl"] < 1e-7
    agree = (ref_lp.argmax(-1) == merged_lp.argmax(-1)).double().mean().item()
    assert report["merged"]["top1_agreement"] == agree
    assert "dense_merge" not in report  # a dense base has no other weights to merge into


# ---- bad input: one error line, exit 2, nothing at --out


@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory):
    """A LoRA adapter (r 4, random B) for the demo's base, written by save_adapter."""
    torch.manual_seed(0)
    model = lora.apply_lora(load_model(DEMO, dtype=torch.float32), r=4, alpha=8, dropout=0.0, targets=TARGETS)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, lora.LoRALinear):
                m.lora_B.normal_(0, 0.1)
    d = tmp_path_factory.mktemp("adapter") / "adapter"
    lora.save_adapter(model, d)
    return d


def _other_base(d):
    small = Transformer(ModelArgs(dim=32, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=1024, multiple_of=16))
    lora.save_adapter(lora.apply_lora(small, r=4, alpha=8, targets=TARGETS), d)


def _edit_config(d, **changes):
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps(cfg | changes))


BAD = {  # name: (how the adapter folder is spoiled, extra flags, what the error says)
    "another base": (_other_base, [], "lora_A of layers.0.attention.wq has shape (4, 32), the model needs (4, 128)"),
    "no adapter_config.json": (lambda d: (d / "adapter_config.json").unlink(), [], "no adapter_config.json in it"),
    "no weights": (lambda d: (d / "adapter_model.safetensors").unlink(), [], "no adapter_model.safetensors in it"),
    "rank": (lambda d: _edit_config(d, r=8), [], "lora_A of layers.0.attention.wq has shape (4, 128), the model "
                                               "needs (8, 128)"),
    "targets": (lambda d: _edit_config(d, target_modules=["q_proj", "v_proj"]), [],
                "target_modules ['q_proj', 'v_proj'], but adapter_model.safetensors holds adapters for"),
    "no folder": (lambda d: shutil.rmtree(d), [], "no such folder"),
    "data given": (lambda d: None, ["--data", "x.jsonl"], "give --out (the folder for the merged model) and no --data"),
    "report data": (lambda d: None, ["--report-data", "nowhere.jsonl"], "nowhere.jsonl"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_error_line(good_adapter, tmp_path, capsys, case):
    spoil, extra, message = BAD[case]
    adapter = tmp_path / "adapter"
    shutil.copytree(good_adapter, adapter)
    if spoil is _other_base:
        shutil.rmtree(adapter)
    spoil(adapter)
    capsys.readouterr()
    assert merge(adapter, tmp_path / "merged", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "merged").exists()


def test_quant_against_the_run_and_an_existing_out(demo_run, tmp_path, capsys):
    """--quant that contradicts the adapter's run (the mistake, asked for) and an --out that holds files are
    refused before anything loads; --overwrite replaces the folder."""
    out = demo_run("nf4", "meta", "chatml", "--val-split", "0.1")
    assert merge(out / "adapter", tmp_path / "merged", "--quant", "none") == 2
    assert "error: --quant none: the adapter was trained on a nf4 base" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "keep.txt").write_text("mine")
    assert merge(out / "adapter", tmp_path / "merged") == 2
    assert "error: --out" in capsys.readouterr().err and (tmp_path / "merged" / "keep.txt").exists()


def test_a_merge_past_the_threshold_is_a_warning(good_adapter, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(train.KL_WARN, torch.float32, -1.0)  # every merge is past it
    assert merge(good_adapter, tmp_path / "merged") == 0
    err = capsys.readouterr().err
    assert f"warning: the merged model {tmp_path / 'merged'} is not the model that was trained" in err
    assert (tmp_path / "merged" / "merge_report.json").exists()
