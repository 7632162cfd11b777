from .tokenizer import Tokenizer
from .model import ModelArgs, Transformer
