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
# no de-duplication.  No line left: the fallback below.  (store.expandQuery then removes every line equal to the
# query, the fallback's lex/vec copies included: ``expanded_searches`` in the next section.)
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
# Read in QMD 2.8.3's dist/store.js (hybridQuery, expandQuery, searchFTS, buildFTS5Query, searchVec,
# reciprocalRankFusion, chunkDocument*, extractTitle, reindexCollection) and dist/llm.js (format*ForEmbedding,
# LlamaCpp.embed*), and held to the real QMD by tests/test_qmd_parity.py.  qmd_unsloth.retrieval runs these rules on
# its own SQLite FTS5 index and MiniLM embeddings; `bench retrieval --engine qmd` runs the real QMD beside it.
#
# hybridQuery (what `qmd query QUERY` runs; `qmd query "lex: ...\nvec: ..."` runs structuredSearch instead, where
# the FIRST list weighs 2.0 whatever its type):
#  1. a BM25 probe: searchFTS(query, 20).  Its top normalised score >= 0.85 leading the second by >= 0.15 skips
#     expansion altogether (not when an intent is given).  The probe is also the raw query's FTS list.
#  2. store.expandQuery: LlamaCpp.expandQuery's lines (the drop rule and fallback above), then every line whose text
#     equals the query (exact, case-sensitive) is removed.  So the fallback's lex/vec copies of the query vanish and a
#     fallback leaves only `hyde: Information about QUERY`.  No cap, no de-duplication: each line is its own list.
#  3. lists, in this order: FTS of the query (the probe), FTS of each lex line, then (only when the index has
#     vectors) the vector search of the query and of each vec/hyde line in the expansion's order.  A list that found
#     nothing is not added.  Weight 2.0 for the query's own lists, 1.0 for the rest (by type, not by position).
#  4. RRF, k = 60, in list order, then +0.05 for a document whose best rank in ANY list is 1, +0.02 for 2-3; sorted by
#     score, ties in order of first appearance (Map insertion order and JavaScript's stable sort).
#  5. the first 40 are the candidates.  `--no-rerank` returns them in RRF order (score 1/rank); otherwise each
#     candidate's best chunk (most query words longer than 2 letters, chunks of 3600 chars) is scored by the reranker
#     and blended: w * 1/rank + (1 - w) * rerank score, w = 0.75 for ranks 1-3, 0.60 for 4-10, 0.40 below.
# searchFTS: FTS5 table (filepath, title, body) with tokenize='porter unicode61', filepath = "COLLECTION/PATH",
# ranked by bm25(1.5, 4.0, 1.0), ascending; score |bm25| / (1 + |bm25|).  No stopwords.
# searchVec: cosine similarity of the query embedding with every chunk's; the best 3 * 20 chunks, each file's best
# chunk, the best 20 files.  NO 0.3 floor in hybridQuery (the 0.3 default belongs to `qmd vsearch` only).
# Documents: every file the glob finds (no part starting with "."; not under node_modules, .git, .cache, vendor,
# dist, build), non-blank; the title is the first "# " or "## " heading of a .md file, else the file name without
# its extension.  Embedding: chunks of <= 900 embedding-model tokens (a first pass of 2700 chars with 405 overlap
# and a 600-char window for break points), each embedded as "title: TITLE | text: CHUNK"; queries as
# "task: search result | query: QUERY" (for every embedding model except Qwen3-Embedding); texts over the model's
# trained context are cut to that context less 4 tokens.
STRONG_SIGNAL_MIN_SCORE = 0.85
STRONG_SIGNAL_MIN_GAP = 0.15
LIST_DEPTH = 20
RRF_K = 60
ORIGINAL_WEIGHT = 2.0
EXPANSION_WEIGHT = 1.0
TOP_RANK_BONUS = {0: 0.05, 1: 0.02, 2: 0.02}  # by 0-based best rank
RERANK_CANDIDATES = 40
RERANK_BLEND = ((3, 0.75), (10, 0.60), (None, 0.40))  # (last 1-based RRF rank, weight of the RRF position score)
FTS_TOKENIZER = "porter unicode61"
FTS_WEIGHTS = (1.5, 4.0, 1.0)  # filepath, title, body
VEC_FETCH = 3  # chunks fetched per file wanted
EXCLUDED_DIRS = ("node_modules", ".git", ".cache", "vendor", "dist", "build")
CHUNK_SIZE_TOKENS, CHUNK_OVERLAP_TOKENS, CHUNK_WINDOW_TOKENS = 900, 135, 200
CHARS_PER_TOKEN_GUESS = 3  # chunkDocumentByTokens' first, character-based pass
CHUNK_SIZE_CHARS, CHUNK_OVERLAP_CHARS, CHUNK_WINDOW_CHARS = 3600, 540, 800  # chunkDocument's defaults (reranking)
EMBED_TRUNCATE_MARGIN = 4


def expanded_searches(query: str, response: str) -> list[tuple[str, str]]:
    """The typed searches hybridQuery runs for a model response: LlamaCpp.expandQuery's lines (drop rule, fallback),
    less every line whose text equals the query (store.expandQuery)."""
    return [(k, t) for k, t in kept_lines(query, response) if t != query]


def strong_signal(scores: list[float], intent: str | None = None) -> bool:
    """Whether the BM25 probe's normalised scores (best first) make hybridQuery skip expansion."""
    if intent or not scores:
        return False
    top, second = scores[0], (scores[1] if len(scores) > 1 else 0.0)
    return top >= STRONG_SIGNAL_MIN_SCORE and top - second >= STRONG_SIGNAL_MIN_GAP


def search_plan(query: str, searches: list[tuple[str, str]], vectors: bool = True) -> list[tuple[str, str, str]]:
    """(backend, query type, text) of every list hybridQuery may add, in its order: FTS of the query, FTS of each lex
    line, then (with vectors) the vector search of the query and of each vec/hyde line."""
    plan = [("fts", "original", query)] + [("fts", "lex", t) for k, t in searches if k == "lex"]
    if vectors:
        plan += [("vec", "original", query)] + [("vec", k, t) for k, t in searches if k in ("vec", "hyde")]
    return plan


def list_weight(query_type: str) -> float:
    return ORIGINAL_WEIGHT if query_type == "original" else EXPANSION_WEIGHT


def rrf(lists: list[list], weights: list[float]) -> list[tuple[object, float]]:
    """reciprocalRankFusion with its top-rank bonus: (key, score) best first, ties in order of first appearance."""
    scores: dict = {}
    top: dict = {}
    for ranked, weight in zip(lists, weights):
        for rank, key in enumerate(ranked):
            contribution = weight / (RRF_K + rank + 1)
            if key in scores:
                scores[key] += contribution
                top[key] = min(top[key], rank)
            else:
                scores[key], top[key] = contribution, rank
    for key in scores:
        scores[key] += TOP_RANK_BONUS.get(top[key], 0.0)
    return sorted(scores.items(), key=lambda kv: -kv[1])


def blend_weight(rank: int) -> float:
    """The RRF position score's weight for a 1-based RRF rank in the reranker's blend."""
    for last, weight in RERANK_BLEND:
        if last is None or rank <= last:
            return weight
    return RERANK_BLEND[-1][1]


def rerank_blend(candidates: list, rerank_scores: list[float]) -> list[tuple[object, float]]:
    """hybridQuery's blend of RRF position and reranker score over the candidates (in RRF order): (key, score)."""
    by_rerank = sorted(zip(candidates, rerank_scores, range(1, len(candidates) + 1)), key=lambda c: -c[1])
    blended = [(key, blend_weight(rank) * (1 / rank) + (1 - blend_weight(rank)) * score)
               for key, score, rank in by_rerank]
    return sorted(blended, key=lambda kv: -kv[1])


def rerank_terms(query: str) -> list[str]:
    """The words hybridQuery uses to pick each candidate's best chunk for the reranker."""
    return [t for t in _SPLIT.split(query.lower()) if len(t) > 2]


def best_chunk(chunks: list[str], terms: list[str]) -> int:
    best, best_score = 0, -1
    for i, chunk in enumerate(chunks):
        low = chunk.lower()
        score = sum(1 for t in terms if t in low)
        if score > best_score:
            best, best_score = i, score
    return best


# --- FTS5: what QMD indexes and how it writes a MATCH expression (buildFTS5Query)
_CJK_RANGES = (  # Unicode scripts Han, Hiragana, Katakana, Hangul (the ranges JavaScript's \p{Script=...} covers)
    (0x1100, 0x11FF), (0x2E80, 0x2E99), (0x2E9B, 0x2EF3), (0x2F00, 0x2FD5), (0x3005, 0x3005), (0x3007, 0x3007),
    (0x3021, 0x3029), (0x302E, 0x302F), (0x3038, 0x303B), (0x3041, 0x3096), (0x309D, 0x309F), (0x30A1, 0x30FA),
    (0x30FD, 0x30FF), (0x3131, 0x318E), (0x31F0, 0x31FF), (0x3200, 0x321E), (0x3260, 0x327E), (0x32D0, 0x32FE),
    (0x3300, 0x3357), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xA960, 0xA97C), (0xAC00, 0xD7A3), (0xD7B0, 0xD7FB),
    (0xF900, 0xFAD9), (0xFF66, 0xFF6F), (0xFF71, 0xFF9D), (0xFFA0, 0xFFDC), (0x1B000, 0x1B122), (0x1F200, 0x1F200),
    (0x20000, 0x323AF),
)


def _is_cjk(ch: str) -> bool:
    o = ord(ch)
    return any(lo <= o <= hi for lo, hi in _CJK_RANGES) if o >= 0x1100 else False


def _word_char(ch: str, extra: str = "") -> bool:
    import unicodedata

    return ch in extra or unicodedata.category(ch)[0] in "LN"


def fts_text(text: str) -> str:
    """normalizeCjkForFTS: every CJK character spaced, so FTS5's unicode61 tokenizer indexes them one by one."""
    out, run = [], []
    for ch in text + "\0":
        if ch != "\0" and _is_cjk(ch):
            run.append(ch)
            continue
        if run:
            out.append(" " + " ".join(run) + " ")
            run = []
        if ch != "\0":
            out.append(ch)
    return "".join(out)


def _sanitize_term(term: str) -> str:
    return "".join(ch for ch in term if _word_char(ch, "'_")).lower()


def _hyphenated(token: str) -> bool:
    if not token or not _word_char(token[0]) or not all(_word_char(ch, "'-") for ch in token):
        return False
    return any(token[i] == "-" and i + 1 < len(token) and _word_char(token[i + 1]) for i in range(1, len(token)))


def _dotted(token: str) -> bool:
    parts = token.split(".")
    return len(parts) >= 2 and all(p and all(_word_char(ch, "_") for ch in p) for p in parts)


def _sanitize_phrase(phrase: str) -> str:
    words = []
    for t in _SPLIT.split(fts_text(phrase)):
        if _dotted(t):
            words += [p for p in (_sanitize_term(x) for x in t.split(".")) if p]
        elif _sanitize_term(t):
            words.append(_sanitize_term(t))
    return " ".join(words)


_TRIM = re.compile(f"^[{_JS_SPACE}]+|[{_JS_SPACE}]+$")


def _space(ch: str) -> bool:
    return bool(_SPLIT.fullmatch(ch))


def fts_query(query: str) -> str | None:
    """buildFTS5Query: terms AND-ed, a bare term a prefix ("term"*), "quotes" a phrase, -term / -"phrase" a NOT,
    multi-agent a phrase, 2.8.3 its parts AND-ed as prefixes, CJK a phrase of characters; None when nothing
    positive is left (QMD then searches nothing)."""
    positive, negative = [], []
    s = _TRIM.sub("", query)
    i = 0
    while i < len(s):
        while i < len(s) and _space(s[i]):
            i += 1
        if i >= len(s):
            break
        negated = s[i] == "-"
        if negated:
            i += 1
        bucket = negative if negated else positive
        if i < len(s) and s[i] == '"':
            start = i = i + 1
            while i < len(s) and s[i] != '"':
                i += 1
            phrase = s[start:i].strip()
            i += 1
            if phrase and _sanitize_phrase(phrase):
                bucket.append(f'"{_sanitize_phrase(phrase)}"')
            continue
        start = i
        while i < len(s) and not _space(s[i]) and s[i] != '"':
            i += 1
        term = s[start:i]
        if _hyphenated(term):
            words = " ".join(p for p in (_sanitize_term(x) for x in term.split("-")) if p)
            if words:
                bucket.append(f'"{words}"')
        elif _dotted(term):
            parts = [f'"{p}"*' for p in (_sanitize_term(x) for x in term.split(".")) if p]
            if parts:
                if negated:
                    negative.append("(" + " AND ".join(parts) + ")")
                else:
                    positive.extend(parts)
        elif any(_is_cjk(ch) for ch in term):
            if _sanitize_phrase(term):
                bucket.append(f'"{_sanitize_phrase(term)}"')
        elif _sanitize_term(term):
            bucket.append(f'"{_sanitize_term(term)}"*')
    if not positive:
        return None
    out = " AND ".join(positive)
    for neg in negative:
        out = f"{out} NOT {neg}"
    return out


def fts_score(bm25: float) -> float:
    """searchFTS's normalised score of an FTS5 bm25() value (negative, lower is better)."""
    return abs(bm25) / (1 + abs(bm25))


def indexed(path: str) -> bool:
    """Whether reindexCollection takes a file at this relative path (hidden parts and build folders are skipped)."""
    parts = path.split("/")
    return not any(p.startswith(".") for p in parts) and not any(p in EXCLUDED_DIRS for p in parts[:-1])


def extract_title(content: str, path: str) -> str:
    """extractTitle: a .md file's first '# '/'## ' heading ('Notes'/'📝 Notes' defer to the first '## '), else the
    file name without its extension."""
    name = path.rsplit("/", 1)[-1]
    ext = name[name.rfind("."):].lower() if "." in name else name.lower()
    if ext == ".md":
        m = re.search(r"^##?\s+(.+)$", content, re.M)
        if m:
            title = m.group(1).strip()
            if title in ("📝 Notes", "Notes"):
                nxt = re.search(r"^##\s+(.+)$", content, re.M)
                if nxt and nxt.group(1):
                    return nxt.group(1).strip()
            if title:
                return title
    elif ext == ".org":
        m = re.search(r"^#\+TITLE:\s*(.+)$", content, re.M | re.I) or re.search(r"^\*+\s+(.+)$", content, re.M)
        if m and m.group(1).strip():
            return m.group(1).strip()
    return re.sub(r"\.[^.]+$", "", path).split("/")[-1] or path


# --- embedding text (llm.js) and chunking (store.js chunkDocument*)
def _qwen3_embedding(model: str) -> bool:
    return bool(re.search(r"qwen.*embed", model, re.I) or re.search(r"embed.*qwen", model, re.I))


def format_query_for_embedding(query: str, model: str = "") -> str:
    if _qwen3_embedding(model):
        return f"Instruct: Retrieve relevant documents for the given query\nQuery: {query}"
    return f"task: search result | query: {query}"


def format_doc_for_embedding(text: str, title: str | None = None, model: str = "") -> str:
    if _qwen3_embedding(model):
        return f"{title}\n{text}" if title else text
    return f"title: {title or 'none'} | text: {text}"


_BREAK_PATTERNS = (
    (r"\n#(?!#)", 100), (r"\n#{2}(?!#)", 90), (r"\n#{3}(?!#)", 80), (r"\n#{4}(?!#)", 70), (r"\n#{5}(?!#)", 60),
    (r"\n#{6}(?!#)", 50), (r"\n```", 80), (r"\n(?:---|\*\*\*|___)\s*\n", 60), (r"\n\n+", 20), (r"\n[-*]\s", 5),
    (r"\n\d+\.\s", 5), (r"\n", 1),
)


def break_points(text: str) -> list[tuple[int, int]]:
    """scanBreakPoints: (position, score) of every place a chunk may end, the best score at each position."""
    seen: dict[int, int] = {}
    for pattern, score in _BREAK_PATTERNS:
        for m in re.finditer(pattern, text):
            if m.start() not in seen or score > seen[m.start()]:
                seen[m.start()] = score
    return sorted(seen.items())


def code_fences(text: str) -> list[tuple[int, int]]:
    regions, start = [], None
    for m in re.finditer(r"\n```", text):
        if start is None:
            start = m.start()
        else:
            regions.append((start, m.end()))
            start = None
    if start is not None:
        regions.append((start, len(text)))
    return regions


def best_cutoff(points, target: int, window: int, fences, decay: float = 0.7) -> int:
    best_score, best_pos = -1.0, target
    for pos, score in points:
        if pos < target - window:
            continue
        if pos > target:
            break
        if any(a < pos < b for a, b in fences):
            continue
        dist = (target - pos) / window if window else 0.0
        final = score * (1.0 - dist * dist * decay)
        if final > best_score:
            best_score, best_pos = final, pos
    return best_pos


def chunk_document(content: str, max_chars: int = CHUNK_SIZE_CHARS, overlap: int = CHUNK_OVERLAP_CHARS,
                   window: int = CHUNK_WINDOW_CHARS) -> list[tuple[str, int]]:
    """chunkDocument: (text, position) chunks of at most ``max_chars``, cut at the best-scored break point near each
    limit and overlapping by ``overlap`` characters.  (Positions count code points; QMD counts UTF-16 units, which
    differ only after characters outside the BMP, such as emoji.)"""
    if len(content) <= max_chars:
        return [(content, 0)]
    points, fences = break_points(content), code_fences(content)
    chunks, pos = [], 0
    while pos < len(content):
        target = min(pos + max_chars, len(content))
        end = target
        if end < len(content):
            cut = best_cutoff(points, target, window, fences)
            if pos < cut <= target:
                end = cut
        if end <= pos:
            end = min(pos + max_chars, len(content))
        chunks.append((content[pos:end], pos))
        if end >= len(content):
            break
        nxt = end - overlap
        pos = end if nxt <= chunks[-1][1] else nxt
    return chunks


def chunk_by_tokens(content: str, tokenize, detokenize=None, max_tokens: int = CHUNK_SIZE_TOKENS,
                    overlap_tokens: int = CHUNK_OVERLAP_TOKENS, window_tokens: int = CHUNK_WINDOW_TOKENS
                    ) -> list[tuple[str, int]]:
    """chunkDocumentByTokens: a character pass at 3 chars a token, then any chunk over ``max_tokens`` (counted with
    ``tokenize``, the embedding model's tokenizer) split again at its own chars-per-token ratio."""
    per = CHARS_PER_TOKEN_GUESS
    overlap_chars, window_chars = overlap_tokens * per, window_tokens * per
    out: list[tuple[str, int]] = []

    def push(text: str, pos: int) -> None:
        tokens = tokenize(text)
        if len(tokens) <= max_tokens or len(text) <= 1:
            if text:
                out.append((text, pos))
            return
        ratio = len(text) / len(tokens)
        safe = max(1, min(len(text) - 1, int(max_tokens * ratio * 0.95) or len(text) // 2))
        ov = max(0, min(safe - 1, int(overlap_chars * ratio / 2))) if safe > 1 else 0
        sub = chunk_document(text, safe, ov, max(0, int(window_chars * ratio / 2)))
        if len(sub) <= 1 or len(sub[0][0]) == len(text):
            sub = chunk_document(text, max(1, len(text) // 2), 0, 0)
        if len(sub) <= 1 or len(sub[0][0]) == len(text):
            cut = detokenize(tokens[:max(1, max_tokens)]) if detokenize else text
            if cut:
                out.append((cut, pos))
            return
        for t, p in sub:
            push(text[p:p + len(t)], pos + p)

    for text, pos in chunk_document(content, max_tokens * per, overlap_chars, window_chars):
        push(text, pos)
    return out
