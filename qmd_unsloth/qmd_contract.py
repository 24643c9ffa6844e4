"""QMD's contract with the query-expansion model, stated once: what the real QMD feeds the model, how it samples,
what it keeps of the answer, and how it fuses what it retrieves.

Every caller imports this module: the training prompt and targets (``prompt``), SFT, GRPO, eval, ``serve``, the GGUF
checks, the reward's drop rule and the retriever.  Each fact was measured on the real QMD 2.8.3 (npm
``@tobilu/qmd``, through node-llama-cpp 3.20.0; ``qmd_unsloth.qmd_real`` installs and runs it, and
``tests/test_qmd_real.py`` holds our side to it) and read in its ``dist/llm.js`` (``expandQuery``) and
``dist/store.js`` (``hybridQuery``), and in node-llama-cpp's chat wrappers.  Where QMD's source on GitHub says
otherwise, the published package wins.  Standard library only; imports in milliseconds.
"""

from __future__ import annotations

import re

QMD_VERSION = "2.8.3"

# --------------------------------------------------------------------------------------------- what the model sees
# QMD: session.prompt(`/no_think Expand this search query: ${query}`) on a LlamaChatSession with node-llama-cpp's
# chat wrapper for the model and node-llama-cpp's default system prompt (config.js defaultChatSystemPrompt).  The
# assistant turn starts with no think block: node-llama-cpp's QwenChatWrapper opens none, and under QMD's grammar the
# model cannot write one.
USER_TEMPLATE = "/no_think Expand this search query: {query}"
DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible.\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering "
    "something incorrectly. If you don't know the answer to a question, don't share false information."
)
END_OF_TURN = "<|im_end|>"  # both supported wrappers end a turn with it (and generation stops at it, or at EOS)

# The chat wrappers node-llama-cpp picks for our bases (chatWrappers/QwenChatWrapper.js, ChatMLChatWrapper.js):
# "Qwen" for a Qwen2/Qwen3 GGUF whose template is Qwen's, "ChatML" for a ChatML template such as SmolLM2's.  ChatML
# starts the context with the model's BOS token (for SmolLM2 that is <|im_start|> again); Qwen writes none.
WRAPPERS = ("Qwen", "ChatML")


def user_text(query: str) -> str:
    return USER_TEMPLATE.format(query=query.strip())


def render_chat(chat: list[dict], wrapper: str = "Qwen", bos: str | None = None) -> str:
    """A chat (OpenAI-style messages) as node-llama-cpp's Qwen or ChatML wrapper renders it for generation: the
    default system prompt when the chat has none, every turn as ``<|im_start|>role\ntext<|im_end|>\n``
    (consecutive system messages joined by a blank line), then the open assistant turn."""
    if wrapper not in WRAPPERS:
        raise ValueError(f"chat wrapper {wrapper!r}: QMD's contract is mirrored for {', '.join(WRAPPERS)} only")
    turns: list[tuple[str, str]] = []
    for m in chat:
        role = {"model": "assistant"}.get(m["role"], m["role"])
        if role == "system" and turns and turns[-1][0] == "system":
            turns[-1] = ("system", f"{turns[-1][1]}\n\n{m['content']}")
        else:
            turns.append((role, m["content"]))
    if not turns or turns[0][0] != "system":
        turns.insert(0, ("system", DEFAULT_SYSTEM_PROMPT))
    head = (bos or "") if wrapper == "ChatML" else ""
    return head + "".join(f"<|im_start|>{r}\n{t}<|im_end|>\n" for r, t in turns) + "<|im_start|>assistant\n"


def render_context(query: str, wrapper: str = "Qwen", bos: str | None = None) -> str:
    """The exact text QMD feeds the model for ``query`` (special tokens written out), up to the assistant's answer."""
    return render_chat([{"role": "user", "content": user_text(query)}], wrapper, bos)


# --------------------------------------------------------------------------------------------- what it may answer
# QMD's grammar, as QMD writes it: one or more lines, each ended by a newline.  End of turn is only allowed where the
# grammar may end, i.e. right after a "\n": a model that writes "...last line<|im_end|>" cannot stop under it and
# runs to MAX_TOKENS.  So every answer line ends with "\n", then end of turn.
GRAMMAR = r'''root ::= line+
line ::= type ": " content "\n"
type ::= "lex" | "vec" | "hyde"
content ::= [^\n]+
'''
KINDS = ("lex", "vec", "hyde")


def answer_text(pairs) -> str:
    """(kind, text) pairs as QMD's grammar writes them: one ``kind: text`` line each, every line newline-ended."""
    return "".join(f"{k}: {' '.join(str(t).split())}\n" for k, t in pairs)


# --------------------------------------------------------------------------------------------- how it samples
# session.prompt(..., {grammar, maxTokens: 600, temperature: 0.7, topK: 20, topP: 0.8,
#                      repeatPenalty: {lastTokens: 64, presencePenalty: 0.5}}) in a context of 2048 tokens, with a
# seed from the clock.  node-llama-cpp's defaults for what QMD leaves out: no min-p, no frequency penalty.
# The presence penalty QMD asks for is INERT: node-llama-cpp 3.20.0 only builds its penalty sampler when the repeat
# penalty differs from 1 (llama/addon/AddonSampler.cpp: ``repeatPenaltyEnabled = repeatPenalty != 1 && ...``; the
# addon's default is 1), and QMD sets none.  Measured on the real thing: greedy output with presencePenalty 5 is
# byte-identical to output without it, and changes once ``penalty`` is 1.0001 (tests/test_qmd_real.py).  So the
# sampling QMD actually applies is temperature, top-k and top-p alone; that is what SAMPLING states.
MAX_TOKENS = 600
CONTEXT_SIZE = 2048  # QMD_EXPAND_CONTEXT_SIZE's default
REQUESTED_PRESENCE_PENALTY = 0.5  # what QMD passes, without effect (above)
SAMPLING = {"temperature": 0.7, "top_k": 20, "top_p": 0.8, "min_p": 0.0, "presence_penalty": 0.0,
            "frequency_penalty": 0.0, "repeat_penalty": 1.0}


def llama_cpp_sampling() -> dict:
    """SAMPLING as ``llama_cpp.Llama.generate`` keywords (its own defaults differ: min-p 0.05, temperature 0.8)."""
    s = SAMPLING
    return {"temp": s["temperature"], "top_k": s["top_k"], "top_p": s["top_p"], "min_p": s["min_p"],
            "presence_penalty": s["presence_penalty"], "frequency_penalty": s["frequency_penalty"],
            "repeat_penalty": s["repeat_penalty"]}


# --------------------------------------------------------------------------------------------- what QMD keeps
# expandQuery: the response is trimmed and split on "\n"; a line is split at its first ":", the type trimmed must be
# exactly lex/vec/hyde, the text is trimmed; a line is DROPPED unless its lowercased text contains one of the
# query's terms as a substring (the query lowercased, every character but [a-z0-9] and JavaScript's \s made a space,
# split on \s; no terms, as in a pure CJK or Cyrillic query: nothing is dropped).  No cap on the number of lines and
# no de-duplication.  No line left: the fallback below.  (A line equal to the query is kept by expandQuery; the
# retriever then searches it again as its own list.)
_JS_SPACE = "\t\n\v\f\r \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
_NON_TERM = re.compile(f"[^a-z0-9{_JS_SPACE}]")
_SPLIT = re.compile(f"[{_JS_SPACE}]+")


def query_terms(query: str) -> tuple[str, ...]:
    """QMD's terms of a query for its drop rule."""
    return tuple(t for t in _SPLIT.split(_NON_TERM.sub(" ", query.lower())) if t)


def keeps(text: str, terms: tuple[str, ...]) -> bool:
    """QMD keeps a line whose lowercased text contains one of ``terms`` (every line when there are none)."""
    if not terms:
        return True
    low = text.lower()
    return any(t in low for t in terms)


def fallback(query: str) -> list[tuple[str, str]]:
    return [("hyde", f"Information about {query}"), ("lex", query), ("vec", query)]


def kept(query: str, response: str) -> list[tuple[str, str]]:
    """The (type, text) lines QMD keeps of a model response (its parsing and drop rule; maybe none)."""
    terms = query_terms(query)
    out = []
    for line in response.strip().split("\n"):
        if ":" not in line:
            continue
        kind, text = line.split(":", 1)
        kind, text = kind.strip(), text.strip()
        if kind in KINDS and keeps(text, terms):
            out.append((kind, text))
    return out


def kept_lines(query: str, response: str) -> list[tuple[str, str]]:
    """The (type, text) searches QMD runs for a model response: the kept lines, or the fallback when none is."""
    return kept(query, response) or fallback(query)


# --------------------------------------------------------------------------------------------- how QMD fuses
# hybridQuery (dist/store.js): a BM25 probe of the raw query (top 20) skips expansion when its top normalised score
# is >= 0.85 and leads the second by >= 0.15 (not when an intent is given).  The raw query goes to FTS and to vector
# search (weight 2.0 each); lex lines to FTS only, vec and hyde lines to vector search only (weight 1.0 each); every
# list is cut at 20.  Reciprocal rank fusion with k = 60, plus a bonus by a document's best rank in ANY list: +0.05
# for rank 1, +0.02 for ranks 2-3.  The top 40 go to the reranker, blended by RRF position.
STRONG_SIGNAL_MIN_SCORE = 0.85
STRONG_SIGNAL_MIN_GAP = 0.15
LIST_DEPTH = 20
RRF_K = 60
ORIGINAL_WEIGHT = 2.0
EXPANSION_WEIGHT = 1.0
TOP_RANK_BONUS = {0: 0.05, 1: 0.02, 2: 0.02}  # by 0-based best rank
RERANK_CANDIDATES = 40
