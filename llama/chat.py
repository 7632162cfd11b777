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

Each template also exists as a Jinja string (`CHAT_TEMPLATES`, written right after its renderer) that
`llama.export.save_tokenizer_files` puts in `tokenizer_config.json`: Hugging Face's `apply_chat_template` and
llama.cpp render it to text, and that text, tokenized the Hugging Face way (special-token text such as "<s>"
becomes its id; each piece of text between special tokens gets SentencePiece's dummy-prefix space), gives
exactly `encode_chat`'s ids. The BOS is in the template text; `add_bos_token` is on for plain text, and llama.cpp drops
a BOS the text starts with before it adds its own, so there is one BOS either way.

The separator that would follow the last message is left off (open-instruct strips the text the same way).
With `add_generation_prompt` the ids end where the model's next reply starts ("[/INST]", "<|assistant|>\\n",
...), so a prompt is always a prefix of the ids the same dialog gets when the reply is there.

How the mask is found: a template renders the dialog as segments, each a token id or a piece of text; the
text between two ids is at most a prompt part and a reply part, which are tokenized *together* (that is
what makes llama2 token-exact; after an id, SentencePiece starts afresh with its dummy-prefix space, as
Meta's per-exchange `encode` and Hugging Face's "legacy" Llama tokenizer do). The reply's tokens are those
after the tokens of the prompt part alone; when a SentencePiece piece straddles the boundary (never for these
templates with Llama's vocabulary, since each reply starts with a space or follows a newline) the straddling
token counts as reply.
"""
from itertools import groupby

from .tokenizer import Tokenizer

TEMPLATES = ("llama2", "chatml", "tulu", "oasst", "alpaca")
ROLES = ("system", "user", "assistant")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
ALPACA_INTRO = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                "the request.")
ALPACA_INTRO_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                      "context. Write a response that appropriately completes the request.")

Segment = tuple[str | int, bool]  # (text or token id, trained)


def required_special_tokens(template: str) -> list[str]:
    """Added tokens the template needs in the tokenizer (and so rows in the embedding)."""
    check_template(template)
    return [IM_START, IM_END] if template == "chatml" else []


def stop_ids(tokenizer: Tokenizer, template: str) -> list[int]:
    """Token ids that end an assistant reply, for generation."""
    check_template(template)
    return [tokenizer.eos_id] + ([_special_id(tokenizer, IM_END, template)] if template == "chatml" else [])


def encode_chat(tokenizer: Tokenizer, messages: list[dict], template: str,
                add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
    """Dialog -> (ids, mask); see the module docstring for the formats."""
    check_template(template)
    msgs = validate_dialog(messages, template, add_generation_prompt)
    if template == "llama2":  # a final user turn is already Meta's generation prompt
        segs = _llama2(tokenizer, msgs)
    elif template == "alpaca":  # the prompt always ends where the reply starts
        segs = _alpaca(tokenizer, msgs)
    else:
        segs = _marked(tokenizer, msgs, template, add_generation_prompt)
    return _encode_segments(tokenizer, segs)


# ---------------------------------------------------------------------------------------------------------
# Checks: every mistake in a dialog is a ValueError that says which message and what was expected.


def check_template(template: str) -> None:
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
    start = 1 if out[0]["role"] == "system" else 0
    turns = out[start:]
    if not turns:
        raise ValueError("the dialog has only a system message; expected user and assistant turns after it")
    if add_generation_prompt and turns[-1]["role"] != "user":
        raise ValueError(f"add_generation_prompt needs the last message to be a user turn, got {turns[-1]['role']!r}")
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
# Templates: messages -> segments (text or token id, trained), each renderer followed by its Jinja twin. A
# Jinja template sees the raw messages, so it repeats what `validate_dialog` does to a message's text: strip it
# (llama2 strips later, where Meta does), and append a non-blank "input" after a blank line (alpaca gives it a
# section).

_CONTENT = ("{%- set content = message['content'] -%}"
            "{%- if message['input'] is defined and message['input'] is string and message['input'] | trim -%}"
            "{%- set content = content + '\\n\\n' + message['input'] | trim -%}{%- endif -%}")
_STRIPPED = _CONTENT.replace("message['content']", "message['content'] | trim")


# ---- llama2


def _llama2(tok: Tokenizer, msgs: list[dict]) -> list[Segment]:
    if msgs[0]["role"] == "system":  # Meta folds the system prompt into the first user turn
        system = f"<<SYS>>\n{msgs[0]['content']}\n<</SYS>>\n\n"
        msgs = [{"role": "user", "content": system + msgs[1]["content"]}] + msgs[2:]
    segs: list[Segment] = []
    for k in range(0, len(msgs), 2):
        segs += [(tok.bos_id, False), (f"[INST] {msgs[k]['content'].strip()} [/INST]", False)]
        if k + 1 < len(msgs):
            segs += [(f" {msgs[k + 1]['content'].strip()} ", True), (tok.eos_id, True)]
    return segs


LLAMA2_JINJA = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('llama2: after an optional system message, turns must alternate user/assistant, "
    "starting with user') }}{%- endif -%}" + _CONTENT +
    "{%- if loop.index0 % 2 == 0 -%}"
    "{{ bos_token + '[INST] ' + ((system if loop.first else '') + content) | trim + ' [/INST]' }}"
    "{%- else -%}{{ ' ' + content | trim + ' ' + eos_token }}{%- endif -%}"
    "{%- endfor -%}"
)


# ---- chatml, tulu, oasst


_MARKERS = {"tulu": {"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n"},
            "oasst": {"system": "### System:", "user": "### User:", "assistant": "### Assistant:"}}


def _marked(tok: Tokenizer, msgs: list[dict], template: str, gen: bool) -> list[Segment]:
    """chatml, tulu, oasst: bos, then each message as its role's marker and its text, "\\n" between messages
    (an empty system prompt is left out). chatml closes every message with <|im_end|>, the others each reply
    with eos; the generation prompt is the assistant's marker."""
    if template == "chatml":
        start, end = _special_id(tok, IM_START, template), _special_id(tok, IM_END, template)
        markers = {role: [(start, False), (f"{role}\n", False)] for role in ROLES}
    else:
        end = tok.eos_id
        markers = {role: [(marker, False)] for role, marker in _MARKERS[template].items()}
    segs: list[Segment] = [(tok.bos_id, False)]
    for m in msgs:
        if m["role"] == "system" and not m["content"]:
            continue
        if len(segs) > 1:
            segs.append(("\n", False))
        trained = m["role"] == "assistant"
        # oasst's "### User: {q}": the space is the text's, so a reply starts with a clean "▁word" token
        text = f" {m['content']}" if template == "oasst" else m["content"]
        segs += markers[m["role"]] + [(text, trained)]
        if trained or template == "chatml":
            segs.append((end, trained))
    return segs + ([("\n", False)] + markers["assistant"] if gen else [])


def _joined_jinja(body: str, gen_prompt: str) -> str:
    """Jinja for `_marked`: bos, the bodies `body` emits (each after "\\n" but the first), the generation prompt."""
    return ("{{- bos_token -}}{%- set ns = namespace(sep='') -%}{%- for message in messages -%}" + _STRIPPED + body +
            "{%- endfor -%}{%- if add_generation_prompt -%}{{ '\\n" + gen_prompt + "' }}{%- endif -%}")


CHATML_JINJA = _joined_jinja(
    "{%- if message['role'] != 'system' or content -%}"
    "{{ ns.sep + '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>' }}{%- set ns.sep = '\\n' -%}"
    "{%- endif -%}", "<|im_start|>assistant\\n")


TULU_JINJA = _joined_jinja(
    "{%- if message['role'] == 'assistant' -%}"
    "{{ ns.sep + '<|assistant|>\\n' + content + eos_token }}{%- set ns.sep = '\\n' -%}"
    "{%- elif content -%}{{ ns.sep + '<|' + message['role'] + '|>\\n' + content }}{%- set ns.sep = '\\n' -%}"
    "{%- endif -%}", "<|assistant|>\\n")


OASST_JINJA = _joined_jinja(
    "{%- if message['role'] == 'assistant' -%}"
    "{{ ns.sep + '### Assistant: ' + content + eos_token }}{%- set ns.sep = '\\n' -%}"
    "{%- elif content -%}{{ ns.sep + ('### System: ' if message['role'] == 'system' else '### User: ') + content }}"
    "{%- set ns.sep = '\\n' -%}{%- endif -%}", "### Assistant:")


# ---- alpaca


def _alpaca(tok: Tokenizer, msgs: list[dict]) -> list[Segment]:
    system = msgs[0]["content"] if msgs[0]["role"] == "system" and msgs[0]["content"] else None
    user, *reply = [m for m in msgs if m["role"] != "system"]
    intro = system or (ALPACA_INTRO_INPUT if "input" in user else ALPACA_INTRO)
    prompt = f"{intro}\n\n### Instruction:\n{user['content']}\n\n"
    if "input" in user:
        prompt += f"### Input:\n{user['input']}\n\n"
    segs: list[Segment] = [(tok.bos_id, False), (prompt + "### Response:\n", False)]
    return segs + ([(reply[0]["content"], True), (tok.eos_id, True)] if reply else [])


assert "'" not in ALPACA_INTRO + ALPACA_INTRO_INPUT  # they go into Jinja string literals below
ALPACA_JINJA = (
    "{%- if messages[0]['role'] == 'system' -%}{%- set intro = messages[0]['content'] | trim -%}"
    "{%- set turns = messages[1:] -%}{%- else -%}{%- set intro = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- if not turns or turns[0]['role'] != 'user' or turns | length > 2 "
    "or (turns | length == 2 and turns[1]['role'] != 'assistant') -%}"
    "{{ raise_exception('alpaca is single-turn: one user message and at most one assistant reply after an "
    "optional system message') }}{%- endif -%}"
    "{%- set message = turns[0] -%}"
    "{%- set input = message['input'] | trim if message['input'] is defined and message['input'] is string "
    "else '' -%}"
    f"{{%- if not intro -%}}{{%- set intro = '{ALPACA_INTRO_INPUT}' if input else '{ALPACA_INTRO}' -%}}{{%- endif -%}}"
    "{{ bos_token + intro + '\\n\\n### Instruction:\\n' + message['content'] | trim + '\\n\\n' }}"
    "{%- if input -%}{{ '### Input:\\n' + input + '\\n\\n' }}{%- endif -%}"
    "{{ '### Response:\\n' }}"
    "{%- if turns | length == 2 -%}{{ turns[1]['content'] | trim + eos_token }}{%- endif -%}"
)


CHAT_TEMPLATES = {"llama2": LLAMA2_JINJA, "chatml": CHATML_JINJA, "tulu": TULU_JINJA, "oasst": OASST_JINJA,
                  "alpaca": ALPACA_JINJA}


# ---------------------------------------------------------------------------------------------------------
# Segments -> (ids, mask).


def _encode_segments(tok: Tokenizer, segs: list[Segment]) -> tuple[list[int], list[bool]]:
    ids: list[int] = []
    mask: list[bool] = []
    for is_text, group in groupby(segs, key=lambda seg: isinstance(seg[0], str)):
        run = list(group)
        if not is_text:
            ids += [piece for piece, _ in run]
            mask += [trained for _, trained in run]
            continue
        # consecutive text segments, tokenized as one string
        prompt = "".join(t for t, trained in run if not trained)
        reply = "".join(t for t, trained in run if trained)
        assert "".join(t for t, _ in run) == prompt + reply, "a text run must be prompt text, then reply text"
        full = tok.encode(prompt + reply)
        head = tok.encode(prompt) if reply else full
        # the prompt's tokens are those `full` shares with `head`: a token that straddles the boundary is reply
        n = next((k for k, (a, b) in enumerate(zip(full, head)) if a != b), min(len(full), len(head)))
        ids += full
        mask += [False] * n + [True] * (len(full) - n)
    return ids, mask
