"""Chat templates: a dialog -> token ids, and the mask of the tokens a fine-tune trains on.

A dialog is a list of `{"role": "system" | "user" | "assistant", "content": str}`; a user message may also
carry `"input"` (Alpaca's second field: the alpaca template gives it its own section, the others append it
to the content after a blank line). `mask[i]` is True exactly on the tokens of each assistant reply and the
token that ends it (eos, or `<|im_end|>` for ChatML), so the loss teaches the model to answer and to stop.
Contents are stripped of surrounding whitespace (as Meta's and open-instruct's formats do; llama2 strips
exactly where Meta's code does). Only llama2 and alpaca constrain the order of user/assistant turns; a
system message may only come first. B = bos, E = eos:

  llama2  Meta's `chat_completion` (meta-llama/llama, llama/generation.py), token for token. The system
          prompt is folded into the first user turn; user/assistant alternate, starting with the user:
            B "[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST]" " {reply} " E   B "[INST] {user} [/INST]" ...
          Each exchange is one SentencePiece call, as in Meta's code.
  chatml  B "<|im_start|>{role}\\n{content}<|im_end|>" joined by "\\n"; `<|im_start|>`/`<|im_end|>` are added
          special tokens (`required_special_tokens`); the trained part is "{reply}<|im_end|>".
  tulu    Tulu 2 / open-instruct: B "<|system|>\\n{s}" "<|user|>\\n{q}" "<|assistant|>\\n" "{reply}" E joined by
          "\\n" (plain-text markers, not special tokens).
  oasst   B "### System: {s}" "### User: {q}" "### Assistant:" " {reply}" E joined by "\\n" (the QLoRA
          Guanaco/OASST1 layout, with the role names `### User:` / `### Assistant:`).
  alpaca  Stanford Alpaca's single-turn prompt, "...\\n\\n### Instruction:\\n{q}\\n\\n[### Input:\\n{input}\\n\\n]
          ### Response:\\n" then "{reply}" E. A system message replaces the opening sentence. Stanford's
          prompt ends at "### Response:"; the newline keeps the reply's first token a clean SentencePiece token.

The separator that would follow the last message is left off (open-instruct strips the text the same way).
With `add_generation_prompt` the ids end where the model's next reply starts ("[/INST]", "<|assistant|>\\n",
...), so a prompt is always a prefix of the ids the same dialog gets when the reply is there.

How the mask is found: a template renders the dialog as segments, each a token id or a piece of text; the
text between two ids is at most a prompt part and a reply part, which are tokenized *together* (that is
what makes llama2 token-exact; after an id, SentencePiece starts afresh with its dummy-prefix space, as
Meta's per-exchange `encode` and Hugging Face's "legacy" Llama tokenizer do). The reply's tokens are those after the tokens of the prompt part alone; when a
SentencePiece piece straddles the boundary (never for these templates with Llama's vocabulary, since each
reply starts with a space or follows a newline) the straddling token counts as reply.
"""
from .tokenizer import Tokenizer

TEMPLATES = ("llama2", "chatml", "tulu", "oasst", "alpaca")
ROLES = ("system", "user", "assistant")
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
ALPACA_INTRO = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
ALPACA_INTRO_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                      "context. Write a response that appropriately completes the request.")

Segment = tuple[str | int, bool]  # (text or token id, trained)


def required_special_tokens(template: str) -> list[str]:
    """Added tokens the template needs in the tokenizer (and so rows in the embedding)."""
    _check_template(template)
    return [IM_START, IM_END] if template == "chatml" else []


def stop_ids(tokenizer: Tokenizer, template: str) -> list[int]:
    """Token ids that end an assistant reply, for generation."""
    _check_template(template)
    return [tokenizer.eos_id] + ([_special_id(tokenizer, IM_END, template)] if template == "chatml" else [])


def encode_chat(tokenizer: Tokenizer, messages: list[dict], template: str,
                add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
    """Dialog -> (ids, mask); see the module docstring for the formats."""
    _check_template(template)
    msgs = validate_dialog(messages, template, add_generation_prompt)
    render = {"llama2": _llama2, "chatml": _chatml, "tulu": _tulu, "oasst": _oasst, "alpaca": _alpaca}[template]
    return _encode_segments(tokenizer, render(tokenizer, msgs, add_generation_prompt))


# ---------------------------------------------------------------------------------------------------------
# Checks: every mistake in a dialog is a ValueError that says which message and what was expected.


def _check_template(template: str) -> None:
    if template not in TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}; expected one of {', '.join(TEMPLATES)}")


def _special_id(tokenizer: Tokenizer, token: str, template: str) -> int:
    if token not in tokenizer.special_tokens:
        raise ValueError(f"the {template} template needs the special tokens {required_special_tokens(template)}, "
                         f"but tokenizer {tokenizer.path} lacks {token!r}: call tokenizer.add_special_tokens(...) "
                         "and resize the model's embeddings (llama.model.resize_embeddings)")
    return tokenizer.special_tokens[token]


def validate_dialog(messages: list[dict], template: str | None = None,
                    add_generation_prompt: bool = False) -> list[dict]:
    """Checked copy of the dialog: {"role", "content"} with content stripped and any "input" resolved.
    With no template, only the checks every template shares (roles, text content, system first)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"the dialog is empty: expected a non-empty list of messages, got {messages!r}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"message {i}: expected a dict with 'role' and 'content', got {m!r}")
        role, content, extra = m.get("role"), m.get("content"), m.get("input")
        if role not in ROLES:
            raise ValueError(f"message {i} has unknown role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"message {i} ({role}): content must be a string, got {type(content).__name__}")
        if role == "system" and i:
            raise ValueError(f"message {i}: a system message may only come first")
        if role != "system" and not content.strip():
            raise ValueError(f"message {i} ({role}) has empty content")
        if extra is not None and (role != "user" or not isinstance(extra, str)):
            raise ValueError(f"message {i} ({role}): 'input' must be a string on a user message, got {extra!r}")
        # llama2 strips exactly where Meta's code does (the folded system + first user turn as one string)
        msg = {"role": role, "content": content if template == "llama2" else content.strip()}
        if extra and extra.strip():
            if template == "alpaca":
                msg["input"] = extra.strip()
            else:
                msg["content"] = f"{msg['content']}\n\n{extra.strip()}"
        out.append(msg)
    turns = out[1:] if out[0]["role"] == "system" else out
    if not turns:
        raise ValueError("the dialog has only a system message; expected user and assistant turns after it")
    if add_generation_prompt and turns[-1]["role"] != "user":
        raise ValueError(f"add_generation_prompt needs the last message to be a user turn, got {turns[-1]['role']!r}")
    start = len(out) - len(turns)
    if template == "llama2":
        for k, m in enumerate(turns):
            want = ("user", "assistant")[k % 2]
            if m["role"] != want:
                raise ValueError(f"message {start + k} is {m['role']!r} where llama2 needs {want!r}: its turns must "
                                 "alternate user/assistant, starting with user (after an optional system message)")
    if template == "alpaca" and [m["role"] for m in turns] not in (["user"], ["user", "assistant"]):
        raise ValueError("alpaca is single-turn: expected one user message and at most one assistant reply after an "
                         f"optional system message, got roles {[m['role'] for m in out]}")
    return out


# ---------------------------------------------------------------------------------------------------------
# Templates: messages -> segments (text or token id, trained).


def _llama2(tok: Tokenizer, msgs: list[dict], gen: bool) -> list[Segment]:
    if msgs[0]["role"] == "system":  # Meta folds the system prompt into the first user turn
        msgs = [{"role": "user", "content": B_SYS + msgs[0]["content"] + E_SYS + msgs[1]["content"]}] + msgs[2:]
    segs: list[Segment] = []
    for k in range(0, len(msgs), 2):
        segs += [(tok.bos_id, False), (f"{B_INST} {msgs[k]['content'].strip()} {E_INST}", False)]
        if k + 1 < len(msgs):
            segs += [(f" {msgs[k + 1]['content'].strip()} ", True), (tok.eos_id, True)]
    return segs  # a final user turn is already Meta's generation prompt


def _joined(bos: int, bodies: list[list[Segment]], gen_prompt: list[Segment] | None) -> list[Segment]:
    """bos, then the message bodies separated by "\\n", then the generation prompt if any."""
    segs: list[Segment] = [(bos, False)]
    for k, body in enumerate(bodies):
        segs += ([("\n", False)] if k else []) + body
    return segs + ([("\n", False)] + gen_prompt if gen_prompt else [])


def _chatml(tok: Tokenizer, msgs: list[dict], gen: bool) -> list[Segment]:
    start, end = _special_id(tok, IM_START, "chatml"), _special_id(tok, IM_END, "chatml")
    bodies = []
    for m in msgs:
        if m["role"] == "system" and not m["content"]:
            continue
        trained = m["role"] == "assistant"
        bodies.append([(start, False), (f"{m['role']}\n", False), (m["content"], trained), (end, trained)])
    return _joined(tok.bos_id, bodies, [(start, False), ("assistant\n", False)] if gen else None)


def _tulu(tok: Tokenizer, msgs: list[dict], gen: bool) -> list[Segment]:
    bodies = []
    for m in msgs:
        if m["role"] == "assistant":
            bodies.append([("<|assistant|>\n", False), (m["content"], True), (tok.eos_id, True)])
        elif m["content"]:
            bodies.append([(f"<|{m['role']}|>\n{m['content']}", False)])
    return _joined(tok.bos_id, bodies, [("<|assistant|>\n", False)] if gen else None)


def _oasst(tok: Tokenizer, msgs: list[dict], gen: bool) -> list[Segment]:
    names = {"system": "System", "user": "User"}
    bodies = []
    for m in msgs:
        if m["role"] == "assistant":
            bodies.append([("### Assistant:", False), (f" {m['content']}", True), (tok.eos_id, True)])
        elif m["content"]:
            bodies.append([(f"### {names[m['role']]}: {m['content']}", False)])
    return _joined(tok.bos_id, bodies, [("### Assistant:", False)] if gen else None)


def _alpaca(tok: Tokenizer, msgs: list[dict], gen: bool) -> list[Segment]:
    system = msgs[0]["content"] if msgs[0]["role"] == "system" and msgs[0]["content"] else None
    user, *reply = [m for m in msgs if m["role"] != "system"]
    intro = system or (ALPACA_INTRO_INPUT if "input" in user else ALPACA_INTRO)
    prompt = f"{intro}\n\n### Instruction:\n{user['content']}\n\n"
    if "input" in user:
        prompt += f"### Input:\n{user['input']}\n\n"
    segs: list[Segment] = [(tok.bos_id, False), (prompt + "### Response:\n", False)]
    return segs + ([(reply[0]["content"], True), (tok.eos_id, True)] if reply else [])


# ---------------------------------------------------------------------------------------------------------
# Segments -> (ids, mask).


def _encode_segments(tok: Tokenizer, segs: list[Segment]) -> tuple[list[int], list[bool]]:
    ids: list[int] = []
    mask: list[bool] = []
    run: list[tuple[str, bool]] = []  # consecutive text segments, tokenized as one string

    def flush() -> None:
        prompt = "".join(t for t, trained in run if not trained)
        reply = "".join(t for t, trained in run if trained)
        assert "".join(t for t, _ in run) == prompt + reply, "a text run must be prompt text, then reply text"
        full = tok.encode(prompt + reply)
        n = len(full)
        if reply:
            head = tok.encode(prompt)
            n = len(head) if full[: len(head)] == head else next(
                (k for k, (a, b) in enumerate(zip(full, head)) if a != b), min(len(full), len(head)))
        ids.extend(full)
        mask.extend([False] * n + [True] * (len(full) - n))
        run.clear()

    for piece, trained in segs:
        if isinstance(piece, str):
            run.append((piece, trained))
            continue
        if run:
            flush()
        ids.append(piece)
        mask.append(trained)
    if run:
        flush()
    return ids, mask
