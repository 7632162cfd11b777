"""NF4 weights in bitsandbytes' format and the kernels that compute with them (QLoRA).

nf4.py: the format, the reference dequantization, NF4Linear and the autograd product; cpu.py: the CPU fast
path of those products; triton_nf4.py: the fused CUDA kernels."""
import logging

# On CPUs with AVX512-BF16, importing bitsandbytes tries to fetch an optional fused inference kernel
# (gemm_4bit_forward, through the `kernels` package) and logs a warning on its CPU backend's logger when it
# cannot. Nothing here calls that kernel, and the line reads like a failure of ours, so that one message is
# dropped; every other record of that logger (and of bitsandbytes) passes. Installed before quant/ first
# imports bitsandbytes: the filter sits on the logger, which exists before bitsandbytes asks for it.
BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_KERNEL_WARNING = "Failed to load CPU gemm_4bit_forward from kernels-community"
logging.getLogger(BNB_CPU_LOGGER).addFilter(lambda record: not str(record.msg).startswith(BNB_KERNEL_WARNING))

from quant.nf4 import NF4, NF4Linear, dequantize_nf4, nf4_matmul, quantize_model, quantize_on_load  # noqa: E402

__all__ = ["NF4", "NF4Linear", "dequantize_nf4", "nf4_matmul", "quantize_model", "quantize_on_load"]
