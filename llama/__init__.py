from .tokenizer import Tokenizer
from .model import ModelArgs, Transformer
from .checkpoint import load_model, save_model
