"""Low-rank adapters: LoRALinear over dense or quantized linears, merging, PEFT-format save/load."""
from lora.lora import LoRALinear, apply_lora, count_parameters, load_adapter, merge_lora, save_adapter

__all__ = ["LoRALinear", "apply_lora", "count_parameters", "load_adapter", "merge_lora", "save_adapter"]
