from .tokenizer import Tokenizer
