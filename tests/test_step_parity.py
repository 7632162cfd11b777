"""One whole training step against the Hugging Face stack: the same weights, packed batch, adapter and
optimizer inputs through ours (train.build_model, model(..., labels=)) and through transformers + peft +
bitsandbytes (LlamaForCausalLM, get_peft_model, Linear4bit), fp32 on CPU; step-0 loss and every trained
gradient must agree. `benchmarks/parity.py` is the one implementation: bench_train.py gates its timings on
it, and tests/test_gpu.py runs it in bf16 on a GPU."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import parity  # noqa: E402

N_LAYERS = parity.SIZES["tiny"]["n_layers"]


@pytest.mark.parametrize("mode", ["full", "lora", "qlora"])
def test_step0_loss_and_gradients_match_transformers_peft_bitsandbytes(tmp_path, mode):
    r = parity.step0_parity(tmp_path, mode, "tiny", "cpu", "fp32", seq_len=64, tokens_per_step=128)
    assert not r["failures"], "; ".join(r["failures"])
    if mode != "full":  # lora_A and lora_B of the seven projections in every layer
        assert r["n_grads"] == 2 * 7 * N_LAYERS
    assert r["n_grads"] > 0 and abs(r["loss0_ours"] - r["loss0_hf"]) <= parity.TOL["fp32"][0]
