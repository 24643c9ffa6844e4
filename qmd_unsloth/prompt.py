"""The one place the prompt lives: messages, rendering, parsing completions, writing targets.

Decision on Qwen3's empty think block: it belongs to the PROMPT.  With ``enable_thinking=False`` the generation
prompt ends ``<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n`` and the Qwen3 template also writes that empty block
before the final assistant answer of a full conversation, so ``prompt + completion`` is exactly the rendered
conversation.  The training completion (the only text that carries loss) is the answer lines plus the end-of-turn
token and never contains ``<think>``.  The reward strips a leading EMPTY think block without cost (a server that
renders the prompt without it lets the model write it), and charges heavily for a non-empty one.

Standard library only at import time; rendering imports transformers' jinja renderer lazily.
"""

from __future__ import annotations

import re
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path

USER_TEMPLATE = "/no_think Expand this search query: {query}"
KINDS_ORDER = ("hyde", "lex", "vec")
END_TOKENS = ("<|im_end|>", "<|endoftext|>")
EMPTY_THINK = "<think>\n\n</think>\n\n"
LINE_RE = re.compile(r"(lex|vec|hyde): (.*\S.*)\Z", re.S)
_THINK_BLOCK = re.compile(r"^\s*<think>(.*?)</think>\s*", re.S)


def messages(query: str) -> list[dict[str, str]]:
    """The chat for one query: a single user turn, no system prompt."""
    return [{"role": "user", "content": USER_TEMPLATE.format(query=query.strip())}]


@lru_cache(maxsize=1)
def qwen3_chat_template() -> str:
    """The real Qwen3 chat template, as shipped inside the trl package (found without importing trl)."""
    spec = find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the Qwen3 chat template ships with trl: pip install trl")
    return (Path(next(iter(spec.submodule_search_locations))) / "chat_templates" / "qwen3.jinja").read_text()


def _render(chat: list[dict], template: str, add_generation_prompt: bool) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(
        [chat], chat_template=template, add_generation_prompt=add_generation_prompt, enable_thinking=False
    )
    return rendered[0]


def _template_of(tokenizer) -> str:
    if tokenizer is None:
        return qwen3_chat_template()
    if isinstance(tokenizer, str):
        return tokenizer
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError("the tokenizer has no chat template")
    return template


def render_prompt(query: str, tokenizer=None) -> str:
    """The text a model sees before it answers (thinking disabled).

    ``tokenizer`` is a tokenizer, a template string, or None for the Qwen3 template.
    """
    return _render(messages(query), _template_of(tokenizer), add_generation_prompt=True)


def render_chat(chat: list[dict], tokenizer=None) -> str:
    """Any chat (an OpenAI request's messages) rendered for generation the same way: thinking disabled."""
    return _render(chat, _template_of(tokenizer), add_generation_prompt=True)


def render_example(query: str, pairs: list[tuple[str, str]], tokenizer=None) -> dict[str, str]:
    """A prompt/completion pair for SFT: ``prompt + completion`` is the rendered conversation.

    The completion is the target text followed by the template's end-of-turn marker (for Qwen3 ``<|im_end|>``),
    with the newline the template writes after it dropped: generation stops at the marker.
    """
    template = _template_of(tokenizer)
    target = format_target(pairs)
    prompt = _render(messages(query), template, add_generation_prompt=True)
    full = _render(messages(query) + [{"role": "assistant", "content": target}], template, add_generation_prompt=False)
    if not full.startswith(prompt):
        raise ValueError("chat template: the generation prompt is not a prefix of the rendered conversation")
    completion = full[len(prompt):].rstrip("\n")
    if not completion.startswith(target):
        raise ValueError("chat template: the rendered answer does not start with the target text")
    return {"prompt": prompt, "completion": completion}


class ExampleRenderer:
    """``render_example`` for many rows with one template, fast: the template is rendered once with placeholders
    and the query and target are substituted.  Every ``check_every``-th row (and the first) is also rendered in full
    and compared; on any difference the renderer falls back to full rendering for good."""

    _Q, _T = "\x00QUERY\x00", "\x00TARGET\x00"

    def __init__(self, tokenizer=None, check_every: int = 250):
        self.template = _template_of(tokenizer)
        self.check_every = check_every
        self.count = 0
        try:
            ph = render_example(self._Q, [("lex", self._T)], self.template)
            self.prompt_ph = ph["prompt"]
            self.completion_ph = ph["completion"].replace(f"lex: {self._T}", self._T, 1)
            self.fast = self.prompt_ph.count(self._Q) == 1 and self.completion_ph.count(self._T) == 1
        except ValueError:
            self.fast = False

    def __call__(self, query: str, pairs) -> dict[str, str]:
        self.count += 1
        if not self.fast:
            return render_example(query, pairs, self.template)
        q = query.strip()
        out = {"prompt": self.prompt_ph.replace(self._Q, q),
               "completion": self.completion_ph.replace(self._T, format_target(pairs))}
        if self.count == 1 or self.count % self.check_every == 0:
            full = render_example(query, pairs, self.template)
            if full != out:
                self.fast = False
                return full
        return out


def format_target(pairs) -> str:
    """Writes (kind, text) pairs as the target text: hyde first, then lex, then vec, order kept within a kind."""
    rank = {k: i for i, k in enumerate(KINDS_ORDER)}
    ordered = sorted(((k, t) for k, t in pairs), key=lambda p: rank.get(p[0], len(rank)))
    return "\n".join(f"{k}: {' '.join(t.split())}" for k, t in ordered)


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
