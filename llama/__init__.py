"""Llama 2: the model, its tokenizer and chat templates, checkpoints in Meta and HF layouts, generation."""
from .tokenizer import Tokenizer
from .model import ModelArgs, Transformer
from .checkpoint import load_model
from .export import save_model

__all__ = ["ModelArgs", "Transformer", "Tokenizer", "load_model", "save_model"]
