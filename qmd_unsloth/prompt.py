"""The one place the training prompt lives: QMD's context for a query, the answer targets, parsing completions.

The prompt is exactly the context the real QMD feeds the model (``qmd_contract.render_context``): node-llama-cpp's
chat wrapper for the model with its default system prompt, the user turn ``/no_think Expand this search query: Q``,
and an assistant turn that starts with no think block.  The wrapper is the one node-llama-cpp picks for the model
(``chat_format``): "Qwen" for a Qwen-architecture model whose chat template is Qwen's, "ChatML" (which writes the
model's BOS token first) for a ChatML template such as SmolLM2's; any other template is refused in one line, because
node-llama-cpp would render it through a Jinja wrapper this project does not mirror.

The completion (the only text that carries loss) is the answer lines, EACH ending in a newline, then the
end-of-turn token: QMD's grammar only lets the model stop after a newline.  ``tests/test_qmd_real.py`` compares
these texts with what the real QMD feeds the model, byte for byte and token for token.

Standard library only at import time; checking a chat template imports transformers' Jinja renderer lazily.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path

from .cli import UserError
from .qmd_contract import END_OF_TURN, WRAPPERS, answer_text, render_chat, render_context, user_text

KINDS_ORDER = ("hyde", "lex", "vec")
END_TOKENS = ("<|im_end|>", "<|endoftext|>")
LINE_RE = re.compile(r"(lex|vec|hyde): (.*\S.*)\Z", re.S)
_THINK_BLOCK = re.compile(r"^\s*<think>(.*?)</think>\s*", re.S)
# node-llama-cpp's QwenChatWrapper._checkModelCompatibility: the GGUF architectures it takes (None: unknown).
QWEN_ARCHITECTURES = frozenset({None, "qwen2", "qwen2moe", "qwen2vl", "qwen3", "qwen3moe", "qwen3vl", "qwen3vlmoe",
                                "qwen35", "qwen35moe"})


class UnsupportedChatTemplate(UserError, ValueError):
    """A model whose chat template QMD would render through a wrapper this project does not mirror (one line)."""


@dataclass(frozen=True)
class ChatFormat:
    """How node-llama-cpp wraps a chat for one model: the wrapper and, for ChatML, the BOS text it writes first."""

    wrapper: str = "Qwen"
    bos: str = ""

    def prompt(self, query: str) -> str:
        return render_context(query, self.wrapper, self.bos)

    def chat(self, messages: list[dict]) -> str:
        return render_chat(messages, self.wrapper, self.bos)


QWEN3 = ChatFormat("Qwen", "")


def messages(query: str) -> list[dict[str, str]]:
    """The user turn QMD sends (node-llama-cpp adds its default system prompt before it)."""
    return [{"role": "user", "content": user_text(query)}]


@lru_cache(maxsize=1)
def qwen3_chat_template() -> str:
    """The real Qwen3 chat template, as shipped inside the trl package (found without importing trl)."""
    spec = find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the Qwen3 chat template ships with trl: pip install trl")
    return (Path(next(iter(spec.submodule_search_locations))) / "chat_templates" / "qwen3.jinja").read_text()


def _jinja(chat: list[dict], template: str) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template([chat], chat_template=template, add_generation_prompt=True)
    return rendered[0]


# Chats node-llama-cpp's template check would also render: a system prompt, a first turn, a later turn.
_PROBES = (
    [{"role": "system", "content": "S1"}, {"role": "user", "content": "U1"}],
    [{"role": "system", "content": "S1"}, {"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"},
     {"role": "user", "content": "U2"}],
)


@lru_cache(maxsize=32)
def chat_format(template: str | None, architecture: str | None = None, bos: str | None = None) -> ChatFormat:
    """The chat wrapper node-llama-cpp picks for a model with this Jinja ``template`` (``tokenizer.chat_template``),
    GGUF ``architecture`` (``general.architecture``; a HF ``model_type`` is the same name) and BOS token text.

    node-llama-cpp (chatWrappers/utils/resolveChatWrapper.js) renders the model's Jinja template and takes the first
    specialized wrapper that renders the same chats; Qwen comes before ChatML and takes only Qwen architectures.
    """
    if not template or not template.strip():
        raise UnsupportedChatTemplate("the model has no chat template: node-llama-cpp would guess a wrapper from its "
                                      "name; train from a base with a Qwen or ChatML chat template")
    try:
        same = all(_jinja(chat, template) == render_chat(chat, "ChatML", "") for chat in _PROBES)
    except Exception as e:  # a template that cannot render these chats (raises, needs other variables, ...)
        raise UnsupportedChatTemplate(f"the model's chat template cannot render a system + user chat ({type(e).__name__}: "
                                      f"{str(e).splitlines()[0][:100] if str(e) else ''}); QMD's node-llama-cpp needs "
                                      "one it can map to a chat wrapper") from None
    if not same:
        raise UnsupportedChatTemplate(
            "the model's chat template is neither Qwen's nor ChatML: node-llama-cpp (inside QMD) would render it "
            f"through its Jinja wrapper, which qmd_unsloth does not mirror; use a base whose template node-llama-cpp "
            f"maps to one of {', '.join(WRAPPERS)} (Qwen3, Qwen2.5, SmolLM2, ...)")
    arch = (architecture or None) and architecture.lower()
    if arch in QWEN_ARCHITECTURES:
        return ChatFormat("Qwen", "")
    return ChatFormat("ChatML", bos or "")


def format_of_tokenizer(tokenizer, architecture: str | None = None, bos_token_id: int | None = None) -> ChatFormat:
    """``chat_format`` for a HF tokenizer (``architecture``: the model's ``config.model_type``; both it and the
    model's ``bos_token_id`` are read from the tokenizer's folder when not given).  The BOS is the tokenizer's, else
    the model config's ``bos_token_id``: llama.cpp's converter writes that one into the GGUF, and node-llama-cpp's
    ChatML wrapper starts the context with it."""
    config = _config(getattr(tokenizer, "name_or_path", None))
    architecture = architecture or config.get("model_type")
    bos = getattr(tokenizer, "bos_token", None)
    bos_id = bos_token_id if bos_token_id is not None else config.get("bos_token_id")
    if not bos and isinstance(bos_id, int):
        try:
            bos = tokenizer.convert_ids_to_tokens(bos_id)
        except (IndexError, TypeError, ValueError):
            bos = None
    return chat_format(getattr(tokenizer, "chat_template", None), architecture, bos)


def model_chat_format(model, tokenizer) -> ChatFormat:
    """The ChatFormat of a model being trained.  A Qwen-architecture tokenizer without a chat template gets the real
    Qwen3 template first (the exported GGUF carries it, so node-llama-cpp picks its Qwen wrapper)."""
    config = getattr(model, "config", None)
    architecture = getattr(config, "model_type", None)
    if not getattr(tokenizer, "chat_template", None) and architecture in QWEN_ARCHITECTURES:
        tokenizer.chat_template = qwen3_chat_template()
    return format_of_tokenizer(tokenizer, architecture, getattr(config, "bos_token_id", None))


def format_of_gguf(metadata: dict, bos: str | None) -> ChatFormat:
    """``chat_format`` for a GGUF: its metadata (llama.cpp's key names) and the text of its BOS token."""
    return chat_format(metadata.get("tokenizer.chat_template"), metadata.get("general.architecture"), bos)


def _config(path) -> dict:
    """The model's config.json beside a tokenizer (empty when there is none, e.g. a tokenizer read from a GGUF)."""
    import json

    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, TypeError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def resolve(fmt=None) -> ChatFormat:
    """A ChatFormat from what callers hold: None (the Qwen3 base this project trains), a ChatFormat, or a tokenizer."""
    if fmt is None:
        return QWEN3
    if isinstance(fmt, ChatFormat):
        return fmt
    return format_of_tokenizer(fmt)


def render_prompt(query: str, fmt=None) -> str:
    """The text the model sees before it answers: QMD's context for ``query`` (``fmt``: see ``resolve``)."""
    return resolve(fmt).prompt(query)


def format_target(pairs) -> str:
    """(kind, text) pairs as the answer text: hyde first, then lex, then vec, order kept within a kind, every line
    ending in a newline (QMD's grammar lets the model stop only after one)."""
    rank = {k: i for i, k in enumerate(KINDS_ORDER)}
    return answer_text(sorted(((k, t) for k, t in pairs), key=lambda p: rank.get(p[0], len(rank))))


def render_example(query: str, pairs, fmt=None) -> dict[str, str]:
    """A prompt/completion pair for SFT: the completion is the answer lines then the end-of-turn token, where
    generation stops under QMD's grammar."""
    return {"prompt": render_prompt(query, fmt), "completion": format_target(pairs) + END_OF_TURN}


def strip_completion(text: str) -> tuple[str, str]:
    """Removes one trailing end token and a leading think block; returns (think text, answer text)."""
    text = text.strip()
    for end in END_TOKENS:
        if text.endswith(end):
            text = text[: -len(end)].rstrip()
            break
    think = ""
    if text.startswith("<think>"):
        m = _THINK_BLOCK.match(text)
        if m:
            think, text = m.group(1).strip(), text[m.end():]
    return think, text


def parse_completion(text: str) -> list[tuple[str, str]]:
    """The (kind, text) pairs of a completion, in order; lines without an exact prefix are skipped."""
    _, body = strip_completion(text)
    out = []
    for line in body.split("\n"):
        m = LINE_RE.match(line.strip())
        if m:
            out.append((m.group(1), m.group(2).strip()))
    return out
