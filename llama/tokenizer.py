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
caller's job.

`hf_tokenizer_json` writes the same tokenizer in the `tokenizers` library's format (`tokenizer.json`), so that
Hugging Face tooling loads an exported folder without converting `tokenizer.model` itself (transformers 5
needs protobuf for that). SentencePiece BPE and `tokenizers` BPE agree when the merges are ranked by the score
of the piece they make, which is how SentencePiece picks the next merge; the normalizer (dummy-prefix space,
spaces as "▁", and extra spaces removed when the model does that) is restated as `tokenizers` normalizers,
which run on each piece of text between special tokens, as `encode` does.
"""
import json
import re
from pathlib import Path

from sentencepiece import SentencePieceProcessor

ADDED_TOKENS_FILE = "added_tokens.json"
SPACE = "\u2581"  # "▁": SentencePiece's stand-in for a space


class Tokenizer:
    def __init__(self, path: str | Path):
        """`path` is a `tokenizer.model` file (or a folder holding one); an `added_tokens.json` beside it is read too."""
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


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _proto_fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """The top-level fields of a protobuf message, in order, as (field number, value).

    Enough of the wire format to read a SentencePiece model's settings and piece types with no protobuf
    dependency."""
    out = []
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        wire = key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            value, i = buf[i:i + n], i + n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        out.append((key >> 3, value))
    return out


def hf_tokenizer_json(tok: Tokenizer) -> dict | None:
    """`tok` as a `tokenizers` tokenizer.json (BOS added to plain text, as Llama 2's Hugging Face export does),
    or None when its SentencePiece model is not the kind this restates exactly: BPE with byte fallback, the
    "identity" normalizer, a dummy prefix and no user-defined pieces (Llama 2's is one)."""
    sp = tok.sp
    model = _proto_fields(sp.serialized_model_proto())
    # ModelProto: 1 pieces (each: 3 type: 1 normal (the default), 2 unknown, 3 control, 4 user-defined, 5 unused,
    # 6 byte), 2 TrainerSpec (3 model_type, 2 = BPE; 35 byte_fallback), 3 NormalizerSpec (1 name,
    # 3 add_dummy_prefix, 4 remove_extra_whitespaces, 5 escape_whitespaces; all three default on)
    trainer = dict(_proto_fields(next((v for f, v in model if f == 2), b"")))
    norm = dict(_proto_fields(next((v for f, v in model if f == 3), b"")))
    types = [dict(_proto_fields(v)).get(3, 1) for f, v in model if f == 1]
    if (trainer.get(3) != 2 or trainer.get(35) != 1 or norm.get(1, b"") != b"identity" or norm.get(3, 1) != 1
            or norm.get(5, 1) != 1 or 4 in types):
        return None
    pieces = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    mergeable = {p: i for i, (t, p) in enumerate(zip(types, pieces)) if t == 1}
    ranked = []
    for piece, i in mergeable.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in mergeable and right in mergeable:
                ranked.append((-sp.get_score(i), i, mergeable[left], mergeable[right], left, right))
    ranked.sort()
    normalizers = [{"type": "Prepend", "prepend": SPACE},
                   {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}]
    if norm.get(4, 1):  # remove_extra_whitespaces: no leading or trailing spaces, runs of spaces collapse to one
        normalizers = [{"type": "Replace", "pattern": {"Regex": "\\A +| +\\z"}, "content": ""},
                       {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}] + normalizers
    special = {i: p for i, (t, p) in enumerate(zip(types, pieces)) if t in (2, 3)}  # unknown and control
    special.update({i: t for t, i in tok.special_tokens.items()})
    bos = pieces[tok.bos_id]
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, t in sorted(special.items())],
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [tok.bos_id], "tokens": [bos]}},
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": SPACE}, "content": " "}, {"type": "ByteFallback"},
            {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": pieces[sp.unk_id()], "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": {p: i for i, p in enumerate(pieces)}, "merges": [[r[4], r[5]] for r in ranked]},
    }
