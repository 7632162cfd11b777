"""NF4 weights in bitsandbytes' format and the kernels that compute with them (QLoRA)."""
from quant.nf4 import NF4, NF4Linear, dequantize_nf4, nf4_matmul, quantize_model, quantize_on_load

__all__ = ["NF4", "NF4Linear", "dequantize_nf4", "nf4_matmul", "quantize_model", "quantize_on_load"]
