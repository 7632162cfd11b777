"""Sampling with a KV cache, and the chat command line `python -m llama.generate`.

Batched decoding follows Meta's `generate` (meta-llama/llama, llama/generation.py): the prompts are
right-padded into one [B, total] buffer, decoding starts at the *shortest* prompt's length, and at each
position a row keeps its own prompt token where it has one and takes the sampled token where it does not.
The first step is one forward over tokens[:, 0:min_len] (prefill); every later step feeds one token per row
and attends to the cached keys/values of everything before it (`Transformer.setup_cache`, `start_pos`).

Sampling: temperature 0 is greedy (argmax). Otherwise softmax(logits / T), then nucleus (top-p) filtering
(Holtzman et al. 2019, "The Curious Case of Neural Text Degeneration"): sort the probabilities, keep the
tokens while the mass before them is at most p (the most likely token is always kept), renormalise, sample.

Streaming text: SentencePiece puts a word's leading space inside its token ("▁world") and drops the space of
the first token when decoding, and byte-fallback tokens carry parts of one UTF-8 character, so decoding
token by token loses spaces and prints broken characters. `TextStream` decodes the whole growing reply and
writes the new suffix, holding back while the text ends in an incomplete character.
"""
import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from .chat import TEMPLATES, encode_chat, required_special_tokens, stop_ids as template_stop_ids
from .checkpoint import find_tokenizer, load_model, resolve_checkpoint, weights_size
from .model import resize_embeddings
from .tokenizer import Tokenizer


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """[..., V] probabilities -> the same with everything outside the top-p nucleus zeroed, renormalised."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # Drop a token when the mass of the tokens before it already exceeds top_p (Meta's rule; the first is always kept).
    sorted_probs[sorted_probs.cumsum(-1) - sorted_probs > top_p] = 0.0
    sorted_probs /= sorted_probs.sum(-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


def sample(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """[B, V] logits -> [B] token ids (drawn with torch's global random generator)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        probs = top_p_filter(probs, top_p)
    return torch.multinomial(probs, 1).squeeze(-1)


@torch.inference_mode()
def generate(model, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             stop_ids: Iterable[int] = (), on_token: Callable[[int, int], None] | None = None,
             vocab_size: int | None = None) -> list[list[int]]:
    """Continue each prompt; returns the new tokens of each, without the stop token that ended it.

    `on_token(batch_index, token_id)` is called for every new token as it is sampled (not for stop tokens).
    `vocab_size` restricts sampling to ids below it (the embedding may be padded past the tokenizer's vocabulary).
    The model runs in eval mode (its previous mode is restored after); its KV cache is set up for this call
    and freed after it.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token (bos)")
    max_seq_len = model.args.max_seq_len
    lens = [len(p) for p in prompts]
    if max(lens) >= max_seq_len:
        raise ValueError(f"generate: a prompt has {max(lens)} tokens; the model's max_seq_len is {max_seq_len}")
    B, total = len(prompts), min(max_seq_len, max(lens) + max_new_tokens)
    device = model.tok_embeddings.weight.device
    # [B, total]: the prompts, right-padded with -1 (Meta's pad_id: "no prompt token here")
    tokens = torch.tensor([p + [-1] * (total - len(p)) for p in prompts], dtype=torch.long, device=device)
    stops = set(int(s) for s in stop_ids)
    out: list[list[int]] = [[] for _ in range(B)]
    done = [max_new_tokens <= 0] * B
    was_training = model.training
    model.eval()
    model.setup_cache(B, total)
    try:
        prev = 0
        for cur in range(min(lens), total):
            if all(done):
                break
            h = model(tokens[:, prev:cur], start_pos=prev, return_hidden=True)  # [B, cur - prev, dim]
            logits = model.output(h[:, -1])  # [B, V]: only the last position is needed
            if vocab_size is not None:
                logits[:, vocab_size:] = float("-inf")
            nxt = torch.where(tokens[:, cur] >= 0, tokens[:, cur], sample(logits, temperature, top_p))
            tokens[:, cur] = nxt
            prev = cur
            for b, t in enumerate(nxt.tolist()):  # one host sync per step
                if done[b] or cur < lens[b]:
                    continue
                if t not in stops:
                    out[b].append(t)
                    if on_token is not None:
                        on_token(b, t)
                done[b] = t in stops or len(out[b]) >= max_new_tokens
    finally:
        model.clear_cache()
        model.train(was_training)
    return out


class TextStream:
    """An `on_token` callback that writes one sequence's text as it grows; `finish()` writes what is left."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.ids, self.shown = tokenizer, [], ""

    def __call__(self, batch_index: int, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):  # U+FFFD: a character whose remaining bytes are still to come
            self._show(text)

    def _show(self, text: str) -> None:
        if len(text) > len(self.shown):
            print(text[len(self.shown):], end="", flush=True)
        self.shown = text

    def finish(self) -> str:
        """Write whatever was held back; returns the whole text."""
        self._show(self.tokenizer.decode(self.ids))
        return self.shown


def reply(model, tokenizer: Tokenizer, messages: list[dict], template: str, max_new_tokens: int = 512,
          temperature: float = 0.6, top_p: float = 0.9) -> str:
    """Generate the assistant's next message for a dialog, streaming its text to stdout; returns the text.

    When the dialog does not fit with room for the reply, the oldest exchanges (after a system message)
    are dropped.
    """
    msgs = list(messages)
    prompt, _ = encode_chat(tokenizer, msgs, template, add_generation_prompt=True)
    budget = model.args.max_seq_len - min(max_new_tokens, model.args.max_seq_len // 2)
    while len(prompt) > budget and sum(m["role"] == "user" for m in msgs) > 1:
        first = 1 if msgs[0]["role"] == "system" else 0
        next_user = next(i for i in range(first + 1, len(msgs)) if msgs[i]["role"] == "user")
        del msgs[first:next_user]
        prompt, _ = encode_chat(tokenizer, msgs, template, add_generation_prompt=True)
    stream = TextStream(tokenizer)
    generate(model, [prompt], max_new_tokens, temperature, top_p, stop_ids=template_stop_ids(tokenizer, template),
             on_token=stream, vocab_size=tokenizer.n_words)
    return stream.finish()


@dataclass
class ChatOptions:
    """The generation and chat settings that `add_chat_args` turns into flags, shared by `python -m llama.generate`
    and `train.py --chat`; the defaults are Meta's chat defaults (temperature 0.6, top-p 0.9)."""
    system: str | None = None
    max_new_tokens: int = 512
    temperature: float = 0.6
    top_p: float = 0.9
    no_history: bool = False


def add_chat_args(parser: argparse.ArgumentParser) -> None:
    """Adds the ChatOptions flags (--system, --max-new-tokens, --temperature, --top-p, --no-history), in one group."""
    d = ChatOptions()
    g = parser.add_argument_group("generation and chat")
    g.add_argument("--system", default=d.system, help="system prompt (kept by /reset)")
    g.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                   help="longest reply, in tokens (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=d.temperature,
                   help="sampling temperature; 0 = greedy (default: %(default)s)")
    g.add_argument("--top-p", type=float, default=d.top_p,
                   help="nucleus sampling: draw from the most likely tokens that make up this probability mass "
                   "(default: %(default)s)")
    g.add_argument("--no-history", action="store_true", default=d.no_history,
                   help="answer each message alone (the chat keeps the earlier exchanges by default)")


def chat_options(args: argparse.Namespace) -> ChatOptions:
    """The parsed add_chat_args flags, checked; ValueError naming the flag when one is out of range."""
    opts = ChatOptions(**{f.name: getattr(args, f.name) for f in fields(ChatOptions)})
    if opts.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {opts.max_new_tokens}")
    if opts.temperature < 0:
        raise ValueError(f"--temperature must be 0 (greedy) or more, got {opts.temperature}")
    if not 0 < opts.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {opts.top_p}")
    return opts


def chat_loop(model, tokenizer: Tokenizer, template: str, options: ChatOptions | None = None) -> None:
    """Interactive chat on stdin/stdout. Each message is answered in the context of the earlier exchanges
    (or alone, with `no_history`); `/reset` forgets them (the system prompt stays); an empty line, `/exit` or
    the end of input quits. An exchange whose reply is empty (the model stopped at once) is left out of the
    history."""
    o = options or ChatOptions()
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input(), where the platform has it)
    start = [{"role": "system", "content": o.system}] if o.system else []
    messages = list(start)
    mode = "each message is answered alone" if o.no_history else "/reset forgets the conversation"
    print(f"chat ({template}); {mode}; an empty line or /exit quits", flush=True)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            break
        if not line.strip() or line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            messages = list(start)
            print("(conversation cleared" + ("; the system prompt is kept)" if o.system else ")"), flush=True)
            continue
        if o.no_history:
            messages = list(start)
        messages.append({"role": "user", "content": line})
        text = reply(model, tokenizer, messages, template, o.max_new_tokens, o.temperature, o.top_p)
        print(flush=True)
        if text.strip():
            messages.append({"role": "assistant", "content": text})
        else:  # an empty reply cannot be part of a dialog (and llama2 needs user/assistant turns to alternate)
            messages.pop()


# ---------------------------------------------------------------------------------------------------------
# Command line (and the chat behind `train.py --chat`, which adds quantization and an adapter).

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def cpu_bf16() -> str:
    """The instructions this CPU multiplies bf16 with, as torch reports them ("AMX", "AVX512-BF16"), or "" when
    it has none. Without them a bf16 matmul converts to fp32 and runs slower than fp32 itself. LLAMA_CPU_BF16=1
    or 0 overrides torch's answer (for a CPU it misreads, and for tests). The torch.cpu probes are private; one
    this torch lacks counts as absent."""
    forced = os.environ.get("LLAMA_CPU_BF16")
    if forced in ("0", "1"):
        return "LLAMA_CPU_BF16=1" if forced == "1" else ""
    probes = (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported"))
    return "/".join(name for name, probe in probes if getattr(torch.cpu, probe, lambda: False)())


def auto_dtype(device: torch.device, ckpt: str | Path) -> tuple[str, str]:
    """What --dtype auto picks on this device, and why. CUDA: bf16. CPU: bf16 where it computes bf16 natively
    (its matmuls about twice fp32's speed, activations half the memory); else fp32 (exact, and faster than
    emulated bf16) up to checkpoints of 2 GiB, then bf16 (in fp32, 7B's embeddings, head and activations would
    double)."""
    if device.type == "cuda":
        return "bf16", "a GPU"
    if isa := cpu_bf16():
        return "bf16", f"this CPU has native bf16, {isa}"
    if weights_size(ckpt) > 2 * 2**30:
        return "bf16", "the checkpoint is over 2 GiB; this CPU has no native bf16"
    return "fp32", "this CPU has no native bf16, neither AVX512-BF16 nor AMX"


def resolve_device_dtype(device: str, dtype: str, ckpt: str | Path) -> tuple[torch.device, torch.dtype]:
    """--device and --dtype, "auto" resolved: the GPU when there is one; the dtype `auto_dtype` picks."""
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    return dev, DTYPES[auto_dtype(dev, ckpt)[0] if dtype == "auto" else dtype]


def load_chat_model(ckpt: str | Path, template: str, device: torch.device, dtype: torch.dtype,
                    tokenizer_dir: str | Path | None = None, hook=None,
                    progress=None) -> tuple[torch.nn.Module, Tokenizer]:
    """(model, tokenizer) for chatting in `template`. The tokenizer is the one in `tokenizer_dir` (an adapter's,
    with the tokens its run added) or the checkpoint's; the embeddings grow to it. ValueError when the template
    needs special tokens the tokenizer lacks. `hook` and `progress` go to load_model (train.py quantizes)."""
    tok_path = find_tokenizer(tokenizer_dir or ckpt)
    if tok_path is None:
        raise ValueError(f"no tokenizer.model in {ckpt} or its parent folder")
    tokenizer = Tokenizer(tok_path)  # reads added_tokens.json beside it
    missing = [t for t in required_special_tokens(template) if t not in tokenizer.special_tokens]
    if missing:
        raise ValueError(f"--template {template} needs the special tokens {missing}, which {tok_path.parent} "
                         "does not define (no added_tokens.json with them): was the model fine-tuned with it?")
    model = load_model(ckpt, dtype=dtype, device=device, hook=hook, progress=progress)  # checks the vocabulary
    resize_embeddings(model, tokenizer.n_words)  # grows only
    return model, tokenizer


def adapter_hint(folder: Path) -> str | None:
    """For a LoRA adapter folder (adapter_config.json, no model config): how to chat with it, naming its base
    from adapter_config.json's base_model_name_or_path, else from the run_config.json train.py writes beside it.
    llama/ does not load adapters (lora/ imports llama/, not the other way round), so train.py --chat does."""
    config = folder / "adapter_config.json"
    if not config.is_file() or (folder / "params.json").is_file() or (folder / "config.json").is_file():
        return None
    base = _json_field(config, "base_model_name_or_path") or _json_field(folder.parent / "run_config.json", "ckpt")
    return (f"{folder} is a LoRA adapter, not a model; chat with it through "
            f"`python train.py --chat --ckpt {base or 'BASE'} --adapter {folder}`"
            + ("" if base else " (BASE: the checkpoint it was trained on)"))


def _json_field(file: Path, key: str):
    """file's top-level `key`, or None when the file is missing, not JSON, or not an object."""
    try:
        return json.loads(file.read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llama.generate", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="Meta or Hugging Face checkpoint folder (tokenizer.model in it or "
                   "its parent), or a repo id already in the Hugging Face hub cache (meta-llama/Llama-2-7b-chat-hf)")
    p.add_argument("--template", default="llama2", choices=TEMPLATES, help="chat template (default: llama2)")
    p.add_argument("--prompt", help="answer this one message and exit; without it, chat interactively")
    p.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                   help="auto: bf16 on a GPU and on CPUs with native bf16 (AMX, AVX512-BF16); elsewhere fp32, "
                   "bf16 for checkpoints over 2 GiB")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    add_chat_args(p)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    try:  # user errors (a wrong folder, a template the tokenizer cannot express) end with a message, not a trace
        opts = chat_options(args)
        ckpt = resolve_checkpoint(args.ckpt)  # a folder, or a repo id in the Hugging Face hub cache
        if (hint := adapter_hint(ckpt)) is not None:
            raise ValueError(hint)
        device, dtype = resolve_device_dtype(args.device, args.dtype, ckpt)
        model, tokenizer = load_chat_model(ckpt, args.template, device, dtype)
        if args.prompt is None:
            chat_loop(model, tokenizer, args.template, opts)
            return 0
        messages = ([{"role": "system", "content": opts.system}] if opts.system else []) + [
            {"role": "user", "content": args.prompt}]
        reply(model, tokenizer, messages, args.template, opts.max_new_tokens, opts.temperature, opts.top_p)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
