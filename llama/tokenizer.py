"""Llama 2's SentencePiece tokenizer, plus added special tokens.

Llama 2 tokenizes with a SentencePiece BPE model (`tokenizer.model`: 32,000 pieces, byte fallback, unk 0,
bos 1, eos 2, no pad so `pad_id` is -1). `encode` is Meta's `Tokenizer.encode`: SentencePiece puts a
"dummy prefix" space in front of every string it encodes ("Hi" -> ["▁Hi"]) and `decode` takes it off again.

Added special tokens (ChatML's `<|im_start|>`, `<|im_end|>`) are not SentencePiece pieces. They get the ids
after the SentencePiece vocabulary (32000, 32001, ...); `encode` splits the text on them first and encodes
the pieces in between with SentencePiece (each piece gets its own dummy prefix, as Hugging Face's "legacy"
Llama tokenizer does); `decode` renders them as their text. They are stored the way Hugging Face stores
them, as `added_tokens.json` ({token: id}) beside `tokenizer.model`, and read back from there. The model's
embedding and output matrices must grow to `n_words` rows (`llama.model.resize_embeddings`): that is the
caller's job. Writing the tokenizer in Hugging Face's formats is `llama.export`'s.
"""
import json
import re
from pathlib import Path

from sentencepiece import SentencePieceProcessor

ADDED_TOKENS_FILE = "added_tokens.json"


class Tokenizer:
    def __init__(self, path: str | Path):
        """`path` is a `tokenizer.model` file (or a folder holding one); an `added_tokens.json` beside it is read
        too."""
        path = Path(path)
        path = path / "tokenizer.model" if path.is_dir() else path
        if not path.is_file():
            raise ValueError(f"tokenizer: {path} does not exist (expected a SentencePiece tokenizer.model)")
        self.path = path
        self.sp = SentencePieceProcessor(model_file=str(path))
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.pad_id: int = self.sp.pad_id()  # -1 for Llama 2: there is no pad token
        self.special_tokens: dict[str, int] = {}  # added tokens, {text: id}
        self._pattern: re.Pattern | None = None
        if (path.parent / ADDED_TOKENS_FILE).exists():
            self._load_added(path.parent / ADDED_TOKENS_FILE)

    @property
    def n_words(self) -> int:
        """Rows the embedding needs: the SentencePiece vocabulary plus the added tokens."""
        return max([self.sp.vocab_size(), *(i + 1 for i in self.special_tokens.values())])

    def _sp_id(self, token: str) -> int | None:
        """The SentencePiece id of `token` when it is already one whole piece (e.g. "<s>"), else None."""
        i = self.sp.piece_to_id(token)
        return i if self.sp.id_to_piece(i) == token else None

    def add_special_tokens(self, tokens: list[str]) -> list[int]:
        """Give each token an id (the next free one after the vocabulary) and return the ids.

        Idempotent: a token added before, or one that is already a SentencePiece piece, keeps its id.
        """
        ids = []
        for tok in tokens:
            if not isinstance(tok, str) or not tok:
                raise ValueError(f"add_special_tokens: tokens must be non-empty strings, got {tok!r}")
            if tok not in self.special_tokens:
                sp_id = self._sp_id(tok)
                self._register(tok, self.n_words if sp_id is None else sp_id)
            ids.append(self.special_tokens[tok])
        return ids

    def _register(self, token: str, i: int) -> None:
        self.special_tokens[token] = i
        # Longest first, so that a token that is a prefix of another never wins the match.
        alternatives = sorted(self.special_tokens, key=len, reverse=True)
        self._pattern = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")

    def _load_added(self, file: Path) -> None:
        try:
            added = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: not valid JSON ({e})") from None
        if not isinstance(added, dict) or not all(isinstance(t, str) and isinstance(i, int) for t, i in added.items()):
            raise ValueError(f"{file}: expected a JSON object {{token: id}}")
        vocab = self.sp.vocab_size()
        new = sorted(i for i in added.values() if i >= vocab)
        if new != list(range(vocab, vocab + len(new))):
            raise ValueError(f"{file}: the ids of the added tokens must be {vocab}, {vocab + 1}, ... (right after the "
                             f"{vocab} SentencePiece pieces of {self.path}), got {new}")
        for t, i in added.items():
            if i < vocab and self._sp_id(t) != i:
                raise ValueError(f"{file}: token {t!r} has id {i}, but piece {i} of {self.path} is "
                                 f"{self.sp.id_to_piece(i)!r}")
            self._register(t, i)

    def _split(self, text: str) -> list[str | int]:
        """Text -> pieces of plain text (str) and added-token ids (int), in order."""
        if self._pattern is None:
            return [text] if text else []
        parts = self._pattern.split(text)  # the capture group keeps the matched tokens at odd positions
        return [self.special_tokens[p] if k % 2 else p for k, p in enumerate(parts) if k % 2 or p]

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"encode: expected a str, got {type(text).__name__}")
        ids = [self.bos_id] if bos else []
        for part in self._split(text):
            ids += [part] if isinstance(part, int) else self.sp.encode(part)
        return ids + [self.eos_id] if eos else ids

    def decode(self, ids: list[int]) -> str:
        out, run = [], []  # run: SentencePiece ids waiting to be decoded together
        n, special = self.n_words, {i: t for t, i in self.special_tokens.items()}
        for i in map(int, ids):
            if not 0 <= i < n:
                raise ValueError(f"decode: token id {i} is outside the vocabulary [0, {n})")
            if i in special:
                out += [self.sp.decode(run), special[i]]
                run = []
            else:
                run.append(i)
        out.append(self.sp.decode(run))
        return "".join(out)

    def save(self, folder: str | Path) -> None:
        """Write tokenizer.model (and added_tokens.json when there are added tokens) into `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "tokenizer.model").write_bytes(self.sp.serialized_model_proto())
        added = folder / ADDED_TOKENS_FILE
        if self.special_tokens:
            ordered = dict(sorted(self.special_tokens.items(), key=lambda kv: kv[1]))
            added.write_text(json.dumps(ordered, indent=2, ensure_ascii=False) + "\n")
        elif added.exists():  # a stale file would give the saved tokenizer tokens this one does not have
            added.unlink()
