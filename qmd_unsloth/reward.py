"""The shared reward: one rule-based score for GRPO, eval and the data tools.

Standard library only (importing it must not import torch).  ``score_expansion(query, completion)`` never raises on
any string and always returns a score in [0, 1].

Points (100 in all):

=========  ===  ==============================================================================================
format      20  at least one lex and one vec line, at most 3 of each and 1 hyde, hyde first
diversity   15  both lex and vec present, lines differ from each other and from the query
hyde        15  present (absent keeps 5), 50-200 characters (CJK count double), not repetitive, on the query's topic
quality     20  lex short (2-5 terms, CJK chunks short) and keyword-like, vec natural language, no filler, no line
                QMD would drop (``qmd_drops``: QMD's own rule), every line shares a content term with the query
entities    10  acronyms, proper nouns and technical tokens of the query survive in the lex lines
thinking    20  no non-empty ``<think>`` block
=========  ===  ==============================================================================================

Hard failures score 0: empty output, a chat-template token inside the text (one trailing ``<|im_end|>`` or
``<|endoftext|>`` is stripped first), any non-empty line without an exact ``lex: ``, ``vec: `` or ``hyde: `` prefix.
Then, on the one number used both as the RL reward and for the eval rating:

- language: the score is multiplied by ``1 - 0.7 x`` the share of lines not written in the query's language or
  script (``in_language``), so a Chinese query expanded into English scores 0.30 at best.  A line's language is
  judged on the words that are not the query's own (nor identifiers, names, numbers, quotations).  For a query in a
  Latin-script language (German, French, ...) a line in another Latin-script language (usually English) costs less
  the more of the query's own words it carries (``CARRY_RELIEF``): QMD keeps it, and FTS5 still finds the query's
  words with it; an English expansion whose every line carries every query word scores within 0.035 of a native
  one, a translation that drops them loses as a foreign script does;
- entity cap: at most 0.45 when no line at all keeps any named entity of the query (QMD loses it);
- echo cap: at most 0.35 when most lines merely repeat the query.

Run ``python -m qmd_unsloth.reward FILE.jsonl`` to score ``{"query", "completion"}`` rows, ``--selftest`` for worked
examples.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

from .cli import command
from .prompt import LINE_RE as _LINE
from .prompt import strip_completion

MAX_POINTS = {"format": 20, "diversity": 15, "hyde": 15, "quality": 20, "entities": 10, "thinking": 20}
TOTAL_POINTS = sum(MAX_POINTS.values())
RATINGS = ((0.80, "Excellent"), (0.60, "Good"), (0.40, "Acceptable"), (0.20, "Poor"), (float("-inf"), "Failed"))
KINDS = ("hyde", "lex", "vec")
HYDE_MIN_CHARS, HYDE_MAX_CHARS = 50, 200
LEX_MAX_TERMS = 5
LEX_MAX_CJK_CHUNK = 6  # longest unspaced CJK chunk in a lex line (see lex_terms)
ECHO_CAP = 0.35
ENTITY_CAP = 0.45
MAX_LINES_COMPARED = 12  # pairwise checks look at this many lines at most (a 1 MB completion stays linear)

_TEMPLATE_TOKEN = re.compile(r"<\|[a-z_]+\|>")
_TOKEN = re.compile(r"\w[\w+#]*(?:[./'-][\w+#]+)*")
# The scripts QMD's index spaces out character by character (its CJK_RUN_PATTERN: Han, Hiragana, Katakana, Hangul).
_HAN = "\u2e80-\u2fdf\u3005\u3007\u3021-\u3029\u3038-\u303b\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
_KANA = "\u3041-\u309f\u30a0-\u30ff\u31f0-\u31ff\uff66-\uff9f"
_HANGUL = "\u1100-\u11ff\u3130-\u318f\ua960-\ua97f\uac00-\ud7af\ud7b0-\ud7ff\uffa0-\uffdc"
_CJK = _HAN + _KANA + _HANGUL
_CJK_CHAR = re.compile(f"[{_CJK}]")
_CJK_EDGE = re.compile(f"(?<=[{_CJK}])(?![{_CJK}])|(?<![{_CJK}])(?=[{_CJK}])")  # where a CJK run starts or ends
_LOWER = "a-z\u00df-\u00f6\u00f8-\u00ff\u0100-\u024f\u1e00-\u1eff"
_ALNUM = "A-Za-z0-9_\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u00ff\u0100-\u024f\u1e00-\u1eff"
_LATIN_END = f"(?![{_ALNUM}+#]|[./'-][{_ALNUM}])"  # where a token of _TOKEN would end
# A Latin word that is no identifier: lowercase letters (inner ' and - allowed), nothing glued to it but CJK.
_PLAIN_LATIN = re.compile(f"(?<![{_ALNUM}+#])(?<![{_ALNUM}][./'-])[{_LOWER}]+(?:['-][{_LOWER}]+)*{_LATIN_END}")
_FIRST_LATIN = re.compile(f"\\W*([A-Z\u00c0-\u00d6\u00d8-\u00de][{_LOWER}]+(?:['-][{_LOWER}]+)*){_LATIN_END}")
_SCRIPT_RUNS = re.compile(f"([{_HAN}]+)|([{_KANA}]+)|([{_HANGUL}]+)|([\u0400-\u052f]+)|([\u0370-\u03ff]+)"
                          "|([\u0590-\u05ff]+)|([\u0600-\u077f]+)|([\u0900-\u097f]+)|([\u0e00-\u0e7f]+)")
_RUN_SCRIPTS = (None, "han", "kana", "hangul", "cyrillic", "greek", "hebrew", "arabic", "devanagari", "thai")
_OTHER_SCRIPT = re.compile(f"[\u0370-\u052f\u0590-\u077f\u0900-\u097f\u0e00-\u0e7f{_CJK}]")  # letters of non-Latin scripts
_CODE = re.compile(r"`[^`]*`|\{[^{}]*\}")
_QUOTED = re.compile(r'"[^"]*"|\u201c[^\u201d]*\u201d')
_CJK_OR_NOT = re.compile(f"[{_CJK}]+|[^{_CJK}]+")
# QMD's drop rule (src/llm.ts expandQuery): the query lowercased, every character but [a-z0-9] and JavaScript's \s
# replaced by a space, split on \s.
_JS_SPACE = "\t\n\v\f\r \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
_QMD_NON_TERM = re.compile(f"[^a-z0-9{_JS_SPACE}]")
_QMD_SPLIT = re.compile(f"[{_JS_SPACE}]+")
_ACRONYM = re.compile(r"[A-Z][A-Z0-9]*[A-Z0-9]\Z")  # AWS, S3, EC2, JWT (>= 2 chars, all caps/digits)
_CAMEL = re.compile(r"[a-z][a-z0-9]*[A-Z]|[A-Z][a-z0-9]+[A-Z]")  # useEffect, PostgreSQL, GitHub
_TECH = re.compile(r"[._/+#]|[a-z][0-9]|[0-9][a-z]|^(1[89]|20)[0-9][0-9]$", re.I)  # node.js, C++, v2, ci/cd, 2025

_SENTENCE_START = re.compile(r"(ing|ed)$|^(best|top|using|setting|getting|list|guide|tips|new|latest|free|cheap)$")
STOPWORDS = frozenset(
    "a an and are as at be been but by can could did do does doing for from had has have how i if in into is it its "
    "me my no not of on or our over should so than that the their them then there these they this to too under up "
    "us was we were what when where which while who whom why will with would you your vs via about after before "
    "between during".split()
)
QUESTION_STARTS = frozenset("how what why when where which who whom whose is are can could should does do did".split())
FILLER = (
    "find information about", "find information on", "information about", "search for", "look up", "looking for",
    "learn about", "details on", "details about", "info on", "info about", "results for", "more about",
)


def _has_filler(text: str) -> bool:
    low = text.lower()
    for f in FILLER:  # a plain loop of substring tests is the fastest form in CPython
        if f in low:
            return True
    return False


# --- languages and scripts -------------------------------------------------------------------------------------------
# Script of the language codes the reward knows; any other ISO 639-1 code is taken as a Latin-script language.
SCRIPT_OF_LANG = {
    "zh": "han", "ja": "kana", "ko": "hangul",
    **dict.fromkeys(("ru", "uk", "bg", "be", "sr", "mk", "kk", "ky", "mn", "tg"), "cyrillic"),
    "el": "greek", **dict.fromkeys(("he", "yi"), "hebrew"), **dict.fromkeys(("ar", "fa", "ur", "ps"), "arabic"),
    **dict.fromkeys(("hi", "mr", "ne", "sa"), "devanagari"), "th": "thai",
}
LANG_OF_SCRIPT = {"han": "zh", "kana": "ja", "hangul": "ko", "cyrillic": "ru", "greek": "el", "hebrew": "he",
                  "arabic": "ar", "devanagari": "hi", "thai": "th"}
# Function words that tell the Latin-script languages apart (a word may vote for several).
_FUNCTION_WORDS = {
    "en": "the and of to is are how what why when where which who with for from does did can my your this that these "
          "those it its be been not or at by on between without about into should would could will has have there "
          "their than then as do no",
    "de": "der die das den dem des und ist sind nicht wie warum wo wann welche welcher welches ein eine einen einem "
          "einer mit für von zu zum zur auf im bei beim oder ich mein meine meinen wird werden kann können sich nach "
          "über unter auch aus ohne gegen wenn dass es",
    "fr": "de le la les des du un une et est sont pour dans avec sur qui que quoi comment pourquoi quand où ce cette ces "
          "mon ma mes pas au aux par ne sans entre quel quelle quels quelles je il elle nous vous leur son sa ses en "
          "mais on",
    "es": "de el la los las del y e es son para con por qué que cómo como cuál cuáles cuando cuándo dónde donde una un mi "
          "mis sin entre se lo al está están en hay más su sus tu muy no",
    "pt": "de o os as do da dos das e é são para com por que como um uma no na nos nas não em ao aos meu minha qual "
          "quais quando onde sem entre se mais seu sua você está estão mas",
}
_LATIN_VOTES: dict[str, tuple[str, ...]] = {}
for _lang, _words in _FUNCTION_WORDS.items():
    for _w in _words.split():
        _LATIN_VOTES[_w] = _LATIN_VOTES.get(_w, ()) + (_lang,)
_DIACRITIC_VOTES = {**dict.fromkeys("äöüß", ("de",)), "ñ": ("es",), **dict.fromkeys("ãõ", ("pt",)),
                    "ç": ("fr", "pt"), **dict.fromkeys("èëîïûùœ", ("fr",)), **dict.fromkeys("âêô", ("fr", "pt")),
                    "à": ("fr", "pt"), **dict.fromkeys("áíóú", ("es", "pt")), "é": ("fr", "es", "pt")}
_ALL_FUNCTION_WORDS = STOPWORDS | frozenset(_LATIN_VOTES) | frozenset(
    "и в во не на с со как что для по из к о об от до за у ли или это мой моя мои".split())
LATIN_LANGS = frozenset(_FUNCTION_WORDS)  # the Latin-script languages told apart by function words
LANGUAGE_WEIGHT = 0.7  # the score is multiplied by 1 - LANGUAGE_WEIGHT x (share of lines not in the query's language)
# For a Latin-script query, a Latin-script line in another language counts 1 - CARRY_RELIEF x (share of the query's
# content terms it carries) of a line: English lines that keep all of a German query's own words cost 0.05 of a line.
CARRY_RELIEF = 0.95
ISO_639_1 = frozenset(
    "aa ab ae af ak am an ar as av ay az ba be bg bi bm bn bo br bs ca ce ch co cr cs cu cv cy da de dv dz ee el en eo "
    "es et eu fa ff fi fj fo fr fy ga gd gl gn gu gv ha he hi ho hr ht hu hy hz ia id ie ig ii ik io is it iu ja jv ka "
    "kg ki kj kk kl km kn ko kr ks ku kv kw ky la lb lg li ln lo lt lu lv mg mh mi mk ml mn mr ms mt my na nb nd ne ng "
    "nl nn no nr nv ny oc oj om or os pa pi pl ps pt qu rm rn ro ru rw sa sc sd se sg si sk sl sm sn so sq sr ss st su "
    "sv sw ta te tg th ti tk tl tn to tr ts tt tw ty ug uk ur uz ve vi vo wa wo xh yi yo za zh zu".split()
)


def _words(text: str) -> list[str]:
    """Word tokens of a text (case kept).  A CJK run (Han, kana, Hangul) is a token of its own, split from letters
    next to it (``Docker容器`` -> ``Docker``, ``容器``): the runs are spaced out first, as QMD's index does."""
    if not text.isascii() and _CJK_CHAR.search(text):
        text = _CJK_EDGE.sub(" ", text)
    return _TOKEN.findall(text)


def _word_count(toks: list[str]) -> int:
    """Words in a token list, a CJK run counting one word per two characters."""
    return sum((len(t) + 1) // 2 if is_cjk(t) else 1 for t in toks)


def is_cjk(tok: str) -> bool:
    return bool(tok) and not tok.isascii() and _CJK_CHAR.match(tok) is not None


def cjk_grams(run: str) -> list[str]:
    """Character bigrams of a CJK run (the run itself when it is one character): CJK term overlap is by bigram."""
    return [run] if len(run) < 2 else [run[i:i + 2] for i in range(len(run) - 1)]


def latin_language(words: list[str]) -> str:
    """en/de/fr/es/pt from function words and diacritics of lowercased words; "" unless one wins with 2+ votes."""
    votes: dict[str, int] = {}
    for w in words:
        langs = _LATIN_VOTES.get(w)
        if langs is None:
            if w.isascii():
                continue
            found: set[str] = set()
            for ch in w:
                found.update(_DIACRITIC_VOTES.get(ch, ()))
            if w.endswith(("ción", "ciones")):
                found = {"es"}  # Portuguese writes -ção
            langs = tuple(found)
        for lang in langs:
            votes[lang] = votes.get(lang, 0) + 1
    if not votes:
        return ""
    best = max(votes, key=votes.__getitem__)
    n1 = votes[best]
    return best if n1 >= 2 and sum(1 for v in votes.values() if v == n1) == 1 else ""


def _script_units(text: str, own: frozenset[str] = frozenset(), names: bool = False) -> tuple[dict[str, int], int]:
    """(units per non-Latin script, Latin words) of a text: a CJK character or a word of another script is one
    unit; identifiers (digits, ``._/+#``, CamelCase, acronyms), capitalised names (all of them with ``names``: a
    Latin word starting a Chinese or Russian line is a name; else the first word of the text counts) and the
    query's own words (``own``) do not count."""
    text = text[:2000]
    units: dict[str, int] = {}
    if not text.isascii():
        for m in _SCRIPT_RUNS.finditer(text):
            i = m.lastindex
            script = _RUN_SCRIPTS[i]
            units[script] = units.get(script, 0) + (len(m.group()) if i <= 3 else 1)  # CJK: characters
    latin = len([1 for w in _PLAIN_LATIN.findall(text) if w not in own])
    if not names:
        first = _FIRST_LATIN.match(text)
        if first and first.group(1).lower() not in own:
            latin += 1
    return units, latin


def detect_language(text: str) -> str:
    """ISO 639-1 code of a query or line from its script (zh, ja, ko, ru, el, he, ar, hi, th) or, for Latin script,
    from function words (en, de, fr, es, pt); "" when it cannot tell (short keywords, identifiers only).  A phrase
    in double quotes is a quotation, not the text's language (``"Ich bin ein Berliner" speech``), unless it is all."""
    if "\"" in text or "\u201c" in text:
        rest = _QUOTED.sub(" ", text)
        text = rest if rest.strip() else text
    units, latin = _script_units(text)
    other = sum(units.values())
    if other and other >= latin:
        if units.get("kana"):
            return "ja"
        return LANG_OF_SCRIPT.get(max(units, key=units.get), "")
    return latin_language(tokens(text)) if latin else ""


def language_of(query: str, lang: str | None = None) -> str:
    """The language a query is reported under: its ``lang`` tag, else detected, else English."""
    return lang or detect_language(query) or "en"


def _line_in_language(text: str, toks: list[str], q: "QueryInfo") -> bool | None:
    """Whether an expansion line is written in the query's language: True, False, or None when it cannot be told
    (a keyword line in a Latin-script language, a line of identifiers, names and numbers only).  Code in backticks
    or braces is not language."""
    if "`" in text or "{" in text:
        text = _CODE.sub(" ", text)
        toks = tokens(text)
    if q.script == "latin":
        if not text.isascii() and _OTHER_SCRIPT.search(text):
            units, latin = _script_units(text, q.token_set)
            if sum(units.values()) > latin:
                return False  # another script dominates
        if q.lang in LATIN_LANGS:
            own = q.token_set  # judged on the words the line adds: the query's own words say nothing of the line
            found = latin_language([t for t in toks if t not in own])
            if found and found != q.lang:  # confirm without quotations and names
                found = latin_language(_vote_words(text, own))
            return (found == q.lang) if found else None
        return True
    if not q.script:
        return True  # a query of identifiers or numbers only: nothing to compare
    units, latin = _script_units(text, q.token_set, names=True)
    own = units.get(q.script, 0)
    if q.script in ("kana", "hangul"):
        own += units.get("han", 0)  # kanji in Japanese, hanja in Korean
    foreign = latin + sum(units.values()) - own
    return own >= foreign if own or foreign else None


_NAME_PARTICLES = frozenset("von van der den de la le du da di del dos das al el bin ibn".split())


def _vote_words(text: str, own: frozenset[str]) -> list[str]:
    """Lowercased words of a line that may vote on its language: not in double quotes, not the query's own words,
    not capitalised names after the first word, not particles of a name (``von der Leyen``, ``de la Cruz``)."""
    raw = _words(_QUOTED.sub(" ", text))
    out = []
    for i, t in enumerate(raw):
        low = t.lower()
        if low in own or (i and t[0].isupper()):
            continue
        if low in _NAME_PARTICLES:
            nxt = [w for w in raw[i + 1:i + 3]]
            k = 0
            while k < len(nxt) and nxt[k].lower() in _NAME_PARTICLES and not nxt[k][0].isupper():
                k += 1
            if k < len(nxt) and nxt[k][0].isupper():
                continue
        out.append(low)
    return out


def carried_share(toks: list[str], q: "QueryInfo") -> float:
    """The share of the query's content terms a line carries: a token of the line starts with the term's stem (as
    FTS5's prefix query of QMD's lex search would find it: ``volume`` carries ``volumes``, ``database`` does not carry
    ``base``)."""
    terms = q.terms
    if not terms:
        return 0.0
    n = 0
    for t in terms:
        stem = _stem(t)
        for w in toks:
            if w.startswith(stem):
                n += 1
                break
    return n / len(terms)


def lines_in_language(verdicts: list[bool | None]) -> list[bool]:
    """Resolves lines whose language cannot be told: they follow the majority of those that can (an expansion whose
    sentences are English has English keyword lines too), and count as in the language on a tie."""
    told_in = sum(1 for v in verdicts if v is True)
    told_off = sum(1 for v in verdicts if v is False)
    undecided = told_off <= told_in
    return [undecided if v is None else v for v in verdicts]


@dataclass(slots=True)
class Dimension:
    name: str
    points: float
    max_points: int
    deductions: list[str] = field(default_factory=list)

    def take(self, points: float, reason: str) -> None:
        self.points -= points
        self.deductions.append(f"-{points:g} {reason}")


@dataclass
class Score:
    score: float
    rating: str
    deductions: list[tuple[str, float, str]]  # (dimension, points taken, reason)
    hard_failure: str | None = None
    notes: list[str] = field(default_factory=list)
    lang: str = ""  # the query's language as scored ("" when it could not be told)
    lines_judged: int = 0  # lines compared with the query's language
    lines_in_language: int = 0  # of those, lines written in it (or only identifiers, names and numbers)

    @property
    def dimensions(self) -> dict[str, Dimension]:
        """Points per dimension with the reason for every deduction (built on demand: GRPO needs only .score)."""
        if self.hard_failure:
            return {n: Dimension(n, 0, m) for n, m in MAX_POINTS.items()}
        dims = {n: Dimension(n, m, m) for n, m in MAX_POINTS.items()}
        for name, points, reason in self.deductions:
            dims[name].take(points, reason)
        for d in dims.values():
            d.points = max(0.0, d.points)
        return dims

    @property
    def reasons(self) -> list[str]:
        out = [f"hard failure: {self.hard_failure}"] if self.hard_failure else []
        order = {n: i for i, n in enumerate(MAX_POINTS)}  # grouped by dimension, as in .dimensions
        out += [f"{n}: -{p:g} {r}" for n, p, r in sorted(self.deductions, key=lambda d: order[d[0]])]
        return out + self.notes

    def as_dict(self) -> dict:
        return {
            "score": round(self.score, 4),
            "rating": self.rating,
            "hard_failure": self.hard_failure,
            "points": {n: round(d.points, 2) for n, d in self.dimensions.items()},
            "reasons": self.reasons,
            "lang": self.lang,
            "lines_in_language": [self.lines_in_language, self.lines_judged],
        }


def rating_for(score: float) -> str:
    for floor, name in RATINGS:
        if score >= floor:
            return name
    return "Failed"


def tokens(text: str) -> list[str]:
    """Lowercased word tokens; technical tokens (node.js, c++, ci/cd) stay whole, quotes and punctuation go; a CJK
    run (Han, kana, Hangul) is a token of its own, split from Latin letters next to it."""
    return _words(text.lower())


def qmd_terms(query: str) -> tuple[str, ...]:
    """QMD's query terms for its drop rule: lowercased, every character but a-z, 0-9 and whitespace made a space."""
    return tuple(t for t in _QMD_SPLIT.split(_QMD_NON_TERM.sub(" ", query.lower())) if t)


def qmd_drops(text: str, terms: tuple[str, ...]) -> bool:
    """QMD's rule (src/llm.ts): a line is dropped unless its lowercased text contains one of the query's terms
    (as a substring); with no terms (a query without a-z/0-9, such as pure CJK or Cyrillic) nothing is dropped."""
    return _qmd_dropped([text.lower()], terms)[0]


def _qmd_dropped(lows: list[str], terms: tuple[str, ...]) -> list[bool]:
    """qmd_drops() for lines already lowercased (a plain loop of substring tests: the fastest form in CPython)."""
    if not terms:
        return [False] * len(lows)
    out = []
    for low in lows:
        for t in terms:
            if t in low:
                out.append(False)
                break
        else:
            out.append(True)
    return out


def lex_terms(text: str, toks: list[str]) -> tuple[int, int]:
    """(terms, longest CJK chunk) of a lex line as QMD's FTS5 query sees it.  Latin text: word tokens.  With CJK,
    every whitespace-separated chunk is one exact phrase of its characters, AND-ed with the others, so the terms are
    the chunks, and a chunk's length counts its CJK characters (katakana half: loanwords are long) plus 2 for each
    Latin word glued to it."""
    if text.isascii() or not _CJK_CHAR.search(text):
        return len(toks), 0
    chunks = text.split()
    longest = 0
    for chunk in chunks:
        if not _CJK_CHAR.search(chunk):
            continue
        n = 0.0
        for piece in _CJK_OR_NOT.findall(chunk):
            if _CJK_CHAR.match(piece):
                n += sum(0.5 if "\u30a0" <= ch <= "\u30ff" else 1 for ch in piece)
            elif _TOKEN.search(piece):
                n += 2 * len(_TOKEN.findall(piece))
        longest = max(longest, n)
    return len(chunks), longest


def text_width(text: str) -> int:
    """Characters with CJK characters counted twice (a CJK character carries about two Latin characters' worth)."""
    if text.isascii():
        return len(text)
    return len(text) + len(_CJK_CHAR.findall(text))


def _stem(tok: str) -> str:
    if len(tok) > 4 and tok.endswith("ies"):
        return tok[:-3] + "y"
    if len(tok) > 3 and tok.endswith("s") and not tok.endswith("ss"):
        return tok[:-1]
    return tok


def _close(a: str, b: str) -> bool:
    """True when two tokens share a stem, a 4-letter prefix, or are one or two typos apart (misspellings)."""
    if a == b or _stem(a) == _stem(b):
        return True
    n = min(len(a), len(b))
    if n >= 4 and a[:4] == b[:4]:
        return True
    if n >= 5 and abs(len(a) - len(b)) <= 2 and a[0] == b[0]:
        return _edit_distance(a, b, 2) <= 2
    return False


def _edit_distance(a: str, b: str, limit: int) -> int:
    prev = prev2 = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cost = 0 if ca == cb else 1
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost))
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:  # transposition
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        if min(cur) > limit:
            return limit + 1
        prev2, prev = prev, cur
    return prev[-1]


@dataclass(frozen=True)
class QueryInfo:
    text: str
    norm: str
    terms: tuple[str, ...]  # content tokens (no stopwords); all tokens when the query is only stopwords
    entities: tuple[str, ...]  # acronyms, proper nouns, technical tokens (lowercased tokens)
    token_set: frozenset[str] = frozenset()
    keys: frozenset[str] = frozenset()  # terms and their stems
    prefixes: frozenset[str] = frozenset()  # 4-letter prefixes of terms of 4+ letters
    grams: frozenset[str] = frozenset()  # character bigrams of the query's CJK runs
    qmd_terms: tuple[str, ...] = ()  # QMD's terms for its drop rule (qmd_terms())
    lang: str = ""  # ISO 639-1 code: the row's tag, else detected ("" when it cannot tell)
    script: str = ""  # the script lines must be written in ("latin", "han", "kana", ...; "" for identifiers only)
    close_terms: tuple[str, ...] = ()  # terms of 5+ letters (not CJK) matched up to a typo

    def shares_term(self, line_toks: list[str]) -> bool:
        """True when a line has a token close to a query term: same stem, same 4-letter prefix, a typo apart, or
        (CJK) a character bigram in common."""
        keys, prefixes, grams = self.keys, self.prefixes, self.grams
        for t in line_toks:
            if t in keys or (len(t) >= 4 and t[:4] in prefixes):
                return True
            if t[-1] == "s" and len(t) <= 4 and _stem(t) in keys:
                return True
            if grams and is_cjk(t) and any(g in grams for g in cjk_grams(t)):
                return True
        return any(_close(t, q) for q in self.close_terms for t in line_toks if len(t) >= 5)


def analyse_query(query: str, lang: str | None = None) -> QueryInfo:
    if lang is None:
        return _analyse_query(query, None)
    if not isinstance(lang, str) or len(lang) != 2 or not lang.isalpha():
        lang = None  # ignore an empty or malformed tag (data.py validates tags)
    return _analyse_query(query, lang and lang.lower())


@lru_cache(maxsize=4096)
def _analyse_query(query: str, lang: str | None) -> QueryInfo:
    query = query[:2000]
    raw = _words(query)
    toks = [t.lower() for t in raw]
    lang = lang or detect_language(query)
    stop = STOPWORDS if lang in ("", "en") else _ALL_FUNCTION_WORDS
    terms = tuple(t for t in toks if t not in stop) or tuple(toks)
    entities: list[str] = []
    for i, word in enumerate(raw):
        low = toks[i]
        if low in stop or low in QUESTION_STARTS:
            continue
        is_entity = bool(
            _ACRONYM.match(word)
            or _CAMEL.search(word)
            or _TECH.search(word.rstrip("."))
            # a proper noun (German capitalises every noun: there capitals say nothing)
            or (lang != "de" and word[0].isupper() and (i > 0 or not _SENTENCE_START.search(low)))
        )
        if is_entity and low not in entities:
            entities.append(low)
    keys = frozenset(terms) | frozenset(map(_stem, terms))
    prefixes = frozenset(t[:4] for t in terms if len(t) >= 4)
    grams = frozenset(g for t in terms if is_cjk(t) for g in cjk_grams(t))
    if lang:
        script = SCRIPT_OF_LANG.get(lang, "latin")
    else:
        units, latin = _script_units(query)
        script = "latin" if latin and latin >= sum(units.values()) else ""
    qterms = qmd_terms(query)
    return QueryInfo(query, " ".join(toks), terms, tuple(entities), frozenset(toks), keys, prefixes, grams,
                     qterms, lang, script,
                     tuple(t for t in terms if len(t) >= 5 and not is_cjk(t)))


def _split(completion: str) -> tuple[str | None, str, list[tuple[str, str]]]:
    """Returns (hard failure, think text, [(kind, text), ...])."""
    think, text = strip_completion(completion)
    if not text.strip():
        return "empty output", think, []
    tok = _TEMPLATE_TOKEN.search(text)
    if tok:
        return f"chat-template token {tok.group(0)} in the output", think, []
    parsed = []
    for ln in text.split("\n"):
        ln = ln.strip()
        if ln:
            m = _LINE.match(ln)
            if m is None:
                return f"line without a lex:/vec:/hyde: prefix: {ln[:60]!r}", think, []
            parsed.append((m.group(1), m.group(2).rstrip()))
    return None, think, parsed


def _jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a and b else 0.0


def score_expansion(query: str, completion: str, lang: str | None = None) -> Score:
    """Scores one completion for one query (see the module docstring for the rubric).  ``lang`` is the query's
    ISO 639-1 code when known (a row's ``lang`` tag, an eval category); otherwise it is detected from the query."""
    if not isinstance(query, str):
        query = "" if query is None else str(query)
    if not isinstance(completion, str):
        completion = "" if completion is None else str(completion)
    failure, think, parsed = _split(completion)
    if failure:
        return Score(0.0, "Failed", [], hard_failure=failure)

    q = analyse_query(query, lang)
    lex: list[str] = []
    vec: list[str] = []
    hyde: list[str] = []
    lists = {"lex": lex, "vec": vec, "hyde": hyde}
    for kind, text in parsed:
        lists[kind].append(text)
    judged = lex[:MAX_LINES_COMPARED] + vec[:MAX_LINES_COMPARED] + hyde[:1]  # the lines every per-line rule reads
    lows = [t[:4000].lower() for t in judged]  # lowercased once: for tokens and for QMD's drop rule
    n_lex = min(len(lex), MAX_LINES_COMPARED)
    judged_toks = [_words(low[:2000]) for low in (lows[:-1] if hyde else lows)]  # tokens() of lowercased text
    if hyde:
        judged_toks.append(_words(lows[-1]))
    hyde_toks = judged_toks[-1] if hyde else []
    lex_toks = judged_toks[:n_lex]
    vec_toks = judged_toks[n_lex:n_lex + min(len(vec), MAX_LINES_COMPARED)]
    out: list[tuple[str, float, str]] = []  # (dimension, points taken, reason)

    # thinking
    if think:
        out.append(("thinking", 20, "non-empty <think> block"))

    # format (a missing kind also costs diversity: together more than an Excellent score can lose)
    if not lex:
        out.append(("format", 12, "no lex line"))
    if not vec:
        out.append(("format", 12, "no vec line"))
    if len(lex) > 3:
        out.append(("format", min(6, 2 * (len(lex) - 3)), f"{len(lex)} lex lines (at most 3)"))
    if len(vec) > 3:
        out.append(("format", min(6, 2 * (len(vec) - 3)), f"{len(vec)} vec lines (at most 3)"))
    if len(hyde) > 1:
        out.append(("format", 5, f"{len(hyde)} hyde lines (at most 1)"))
    if hyde and parsed[0][0] != "hyde":
        out.append(("format", 3, "hyde is not the first line"))

    # diversity
    if not lex or not vec:
        out.append(("diversity", 10, "only one kind of search line (QMD runs lex and vec searches side by side)"))
    lex_norms = [" ".join(t) for t in lex_toks]
    vec_norms = [" ".join(t) for t in vec_toks]
    norms = lex_norms + vec_norms + ([" ".join(hyde_toks)] if hyde else [])
    echoes = len([1 for n in norms if n == q.norm and n])
    if echoes:
        out.append(("diversity", min(10, 4 * echoes), f"{echoes} line(s) only repeat the query"))
    dupes = len(norms) - len(set(norms))
    if dupes:
        out.append(("diversity", min(10, 4 * dupes), f"{dupes} duplicated line(s)"))
    if len(vec_toks) > 1:
        vec_sets = [set(t) for t in vec_toks]
        near = 0
        for i, a in enumerate(vec_sets):
            for b in vec_sets[i + 1:]:
                if a != b and _jaccard(a, b) >= 0.8:
                    near += 1
        if near:
            out.append(("diversity", min(6, 3 * near), f"{near} pair(s) of nearly identical vec lines"))
    reordered = len([1 for t, n in zip(vec_toks, vec_norms) if n != q.norm and set(t) == q.token_set])
    if reordered:
        out.append(("diversity", min(6, 3 * reordered), f"{reordered} vec line(s) only reorder the query"))

    # hyde
    if not hyde:
        out.append(("hyde", 10, "no hyde passage (dense retrieval gains from one)"))
    else:
        n = text_width(hyde[0][:4000])
        if n < HYDE_MIN_CHARS:
            out.append(("hyde", 5, f"hyde is {n} chars (fewer than {HYDE_MIN_CHARS})"))
        elif n > HYDE_MAX_CHARS:
            out.append(("hyde", 5 if n <= 2 * HYDE_MAX_CHARS else 8, f"hyde is {n} chars (more than {HYDE_MAX_CHARS})"))
        stop = STOPWORDS if q.lang in ("", "en") else _ALL_FUNCTION_WORDS
        content = [w for w in hyde_toks if w not in stop]
        if not hyde[0].isascii():  # CJK text: numbers and one-character runs (年, 月) are not words
            content = [w for w in content if len(w) > 1 and not w.isdigit()]
        if content:
            counts: dict[str, int] = {}
            for w in content:
                counts[w] = counts.get(w, 0) + 1
            if max(counts.values()) > 3 or (len(content) >= 8 and len(counts) / len(content) < 0.5):
                out.append(("hyde", 5, "hyde repeats words"))
        if q.terms and hyde_toks and not q.shares_term(hyde_toks[:400]):
            out.append(("hyde", 3, "hyde shares no term with the query"))

    # quality
    plain = completion.isascii()
    if plain:
        long_lex, long_chunk = len([1 for tk in lex_toks if len(tk) > LEX_MAX_TERMS]), 0
    else:
        lex_shape = [lex_terms(t[:2000], tk) for t, tk in zip(lex, lex_toks)]
        long_lex = len([1 for n, _ in lex_shape if n > LEX_MAX_TERMS])
        long_chunk = len([1 for n, c in lex_shape if c > LEX_MAX_CJK_CHUNK and n <= LEX_MAX_TERMS])
    if long_lex:
        out.append(("quality", min(8, 4 * long_lex), f"{long_lex} lex line(s) over {LEX_MAX_TERMS} terms (FTS5 ANDs them)"))
    if long_chunk:
        out.append(("quality", min(8, 4 * long_chunk), f"{long_chunk} lex line(s) with an unspaced CJK chunk over "
                    f"{LEX_MAX_CJK_CHUNK:g} characters (FTS5 needs the whole chunk as one exact phrase)"))
    wordy = len([1 for t, tk in zip(lex, lex_toks) if t.endswith("?") or (len(tk) > 2 and tk[0] in QUESTION_STARTS)])
    if wordy:
        out.append(("quality", min(4, 2 * wordy), f"{wordy} lex line(s) read as a question, not keywords"))
    short_vec = len([1 for t in vec_toks if len(t) < 3 and _word_count(t) < 3])
    if short_vec:
        out.append(("quality", min(6, 3 * short_vec), f"{short_vec} vec line(s) under 3 words (not natural language)"))
    size = len if plain else (lambda t: text_width(t.replace(" ", "")))  # CJK lex lines are spaced, vec lines not
    if lex and vec and sum(map(size, lex)) / len(lex) >= sum(map(size, vec)) / len(vec):
        out.append(("quality", 3, "lex lines are not shorter than vec lines"))
    if _has_filler(completion[:20000]):
        filler = len([1 for t in (lex + vec)[:MAX_LINES_COMPARED] if _has_filler(t[:300])])
        if filler:
            out.append(("quality", min(8, 4 * filler), f"{filler} line(s) with generic filler such as 'search for'"))
    dropped = _qmd_dropped(lows, q.qmd_terms)
    if any(dropped):
        n = sum(dropped)
        out.append(("quality", min(12, 4 * n), f"{n} line(s) without any of the query's terms {list(q.qmd_terms)[:6]} "
                    "(QMD drops them)"))
    if q.terms:
        off_topic = len([1 for d, t in zip(dropped[:len(lex_toks) + len(vec_toks)], lex_toks + vec_toks)
                         if not d and not q.shares_term(t[:100])])
        if off_topic:
            out.append(("quality", min(6, 2 * off_topic), f"{off_topic} lex/vec line(s) share no content term "
                        "with the query"))

    # entities
    in_lex = not q.entities  # some entity of the query is in some lex line
    if q.entities and not lex:
        out.append(("entities", 10, "no lex line to carry the query's entities"))
    elif q.entities:
        lex_sets = [set(t) for t in lex_toks]
        for e in q.entities:
            hits = len([1 for ls in lex_sets if e in ls])
            if hits == 0:
                out.append(("entities", 10, f"entity {e!r} missing from every lex line"))
            else:
                in_lex = True
                if hits < len(lex_sets):
                    out.append(("entities", 2, f"entity {e!r} missing from {len(lex_sets) - hits} lex line(s)"))
    lost_entities = not in_lex and not any(e in t for t in judged_toks for e in q.entities)

    # language: every judged line is compared with the query's language or script
    cost = 0.0  # lines off the query's language, a Latin line weighed down by the query's words it carries
    if q.script == "latin" and q.lang not in LATIN_LANGS and (plain or not _OTHER_SCRIPT.search(completion[:20000])):
        in_lang = None  # nothing to compare: a Latin-script query without a told language, Latin-script lines
        off = 0
    else:
        in_lang = lines_in_language([_line_in_language(t[:2000], tk, q) for t, tk in zip(judged, judged_toks)])
        off = len(in_lang) - sum(in_lang)
        for ok, t, tk in zip(in_lang, judged, judged_toks):
            if not ok:
                latin_line = q.script == "latin" and (t.isascii() or not _OTHER_SCRIPT.search(t[:2000]))
                cost += 1 - CARRY_RELIEF * carried_share(tk, q) if latin_line else 1

    taken = dict.fromkeys(MAX_POINTS, 0.0)
    for name, points, _ in out:
        taken[name] += points
    total = sum(max(0.0, MAX_POINTS[n] - t) for n, t in taken.items()) if out else TOTAL_POINTS
    score = min(1.0, total / TOTAL_POINTS)
    notes = []
    if off:
        factor = 1 - LANGUAGE_WEIGHT * cost / len(judged)
        light = f"; they carry the query's words, weighing {cost:.2f} line(s)" if cost < off - 1e-9 else ""
        notes.append(f"language: {off} of {len(judged)} line(s) not in the query's language "
                     f"({q.lang or q.script}){light}, score x{factor:.2f}")
        score *= factor
    if lost_entities:
        notes.append(f"entity cap: no line keeps any of the query's entities {list(q.entities)}, "
                     f"score capped at {ENTITY_CAP}")
        score = min(score, ENTITY_CAP)
    if echoes * 2 > len(norms):
        notes.append(f"echo cap: most lines repeat the query, score capped at {ECHO_CAP}")
        score = min(score, ECHO_CAP)
    return Score(score, rating_for(score), out, notes=notes, lang=q.lang, lines_judged=len(judged),
                 lines_in_language=len(judged) - off)


def _completion_text(completion) -> str:
    """TRL passes strings (standard format) or lists of messages (conversational format)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "".join(m.get("content", "") if isinstance(m, dict) else str(m) for m in completion)
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    return "" if completion is None else str(completion)


def grpo_reward(completions: list, query: list[str] | None = None, lang: list[str] | None = None,
                **kwargs) -> list[float]:
    """TRL reward function: ``GRPOTrainer(reward_funcs=[grpo_reward])`` with a ``query`` column in the dataset
    (and optionally ``lang``: the rows' ISO 639-1 tags, "" where untagged)."""
    if query is None:
        raise ValueError("grpo_reward needs the dataset's 'query' column (TRL passes extra columns as keywords)")
    langs = lang if lang is not None else [None] * len(query)
    return [score_expansion(q, _completion_text(c), lg or None).score
            for q, c, lg in zip(query, completions, langs)]


grpo_reward.__name__ = "qmd_expansion_reward"


SELFTEST = [
    ("auth config", "hyde: Set AUTH_SECRET and AUTH_URL in .env; the auth config file defines providers and session TTL.\n"
     "lex: auth config\nlex: authentication settings env\nvec: how do I configure authentication for my app\n"
     "vec: where are the auth configuration options defined"),
    ("auth config", "lex: auth config\nvec: auth config"),
    ("React hooks", "lex: hooks tutorial\nlex: state management\nvec: how do react hooks like useState work"),
    ("docker volumes", "<think>The user wants docker volumes.</think>\nlex: docker volumes\nvec: how do docker volumes persist data"),
    ("docker volumes", "Here are some expansions:\nlex: docker volumes"),
    ("docker volumes", "lex: docker volumes<|im_start|>assistant"),
    ("who is TDS motorsports", "lex: find information about\nlex: company details\n"
     "vec: who is this company and what do they do"),
    ("docker volume persistence", "hyde: Docker volumes live under /var/lib/docker/volumes and outlive containers.\n"
     "lex: docker volumes\nlex: docker volume mount persist"),
    ("Docker 容器 网络", "lex: Docker 容器 网络 配置\nlex: Docker 网络 驱动\nvec: 如何让两个 Docker 容器互相访问\n"
     "vec: Docker 容器网络和宿主机网络有什么区别"),
    ("Docker 容器 网络", "lex: docker container network\nlex: docker bridge driver\n"
     "vec: how do two docker containers talk to each other\nvec: docker container network versus host network"),
]


def _summarise(scores: list[Score]) -> str:
    from collections import Counter

    n = len(scores)
    if not n:
        return "no rows"
    mean = sum(s.score for s in scores) / n
    counts = Counter(s.rating for s in scores)
    parts = ", ".join(f"{name} {counts.get(name, 0)}" for _, name in RATINGS)
    return f"{n} rows, mean score {mean:.3f}; {parts}"


@command("reward")
def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import sys

    ap = argparse.ArgumentParser(prog="python -m qmd_unsloth.reward", description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", help='JSONL files of {"query": ..., "completion": ...} rows (optional "lang")')
    ap.add_argument("--selftest", action="store_true", help="print worked examples")
    ap.add_argument("--verbose", "-v", action="store_true", help="print every row's score and reasons")
    args = ap.parse_args(argv)
    if not args.files and not args.selftest:
        ap.error("give a JSONL file or --selftest")
    if args.selftest:
        for query, completion in SELFTEST:
            s = score_expansion(query, completion)
            print(f"query: {query}\n  " + completion.replace("\n", "\n  "))
            print(f"  => {s.score:.3f} {s.rating}")
            for r in s.reasons:
                print(f"     {r}")
            print()
    scores: list[Score] = []
    bad = 0
    for path in args.files:
        try:
            fh = open(path, encoding="utf-8")
        except OSError as e:
            print(f"error: {path}: cannot read: {e.strerror}", file=sys.stderr)
            return 1
        with fh:
            try:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                        query, completion = row["query"], row["completion"]
                    except (ValueError, KeyError, TypeError) as e:
                        print(f"{path}:{lineno}: need a JSON object with 'query' and 'completion' ({e})", file=sys.stderr)
                        bad += 1
                        continue
                    s = score_expansion(query, completion, row.get("lang") or None)
                    scores.append(s)
                    if args.verbose:
                        print(f"{path}:{lineno}: {s.score:.3f} {s.rating} {query!r}")
                        for r in s.reasons:
                            print(f"    {r}")
            except UnicodeDecodeError as e:
                print(f"error: {path}: not UTF-8 ({e.reason} at byte {e.start})", file=sys.stderr)
                return 1
    if args.files:
        print(_summarise(scores))
    if bad:
        print(f"error: {bad} bad row(s) skipped (listed above)", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
