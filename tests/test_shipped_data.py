"""Floors on the shipped training data and the held-out eval queries (issue: training data)."""

from collections import Counter

import pytest

from qmd_unsloth.data import (DEFAULT_DATA_DIR, data_files, load_examples, near_duplicate_key, normalise_query,
                              read_examples, stats, validate)
from qmd_unsloth.reward import cjk_grams, is_cjk, text_width, tokens

CATEGORIES = {"programming", "errors_debugging", "devops", "databases", "ml_ai", "science", "howto",
              "health_fitness", "finance_legal", "travel_places", "people_orgs", "personal_notes", "temporal",
              "short_keywords", "long_questions", "quoted_phrases", "misspellings"}


@pytest.fixture(scope="module")
def examples():
    return load_examples()


@pytest.fixture(scope="module")
def figures(examples):
    return stats(examples)


def eval_queries(with_category=False):
    from qmd_unsloth.eval import read_queries

    pairs = read_queries(DEFAULT_DATA_DIR / "eval_queries.txt")
    return pairs if with_category else [q for _, q in pairs]


def test_every_file_validates():
    errors, good = validate(data_files())
    assert errors == [] and good >= 2000


def test_at_least_2000_unique_queries_and_no_duplicates(examples):
    raw = [ex for p in data_files() for _, ex, _ in read_examples(p) if ex]
    assert len(examples) >= 2000
    assert len(raw) == len(examples), "duplicate queries (after normalisation) in data/*.jsonl"


def test_no_near_duplicate_rows(examples):
    keys = Counter(near_duplicate_key(ex.query) for ex in examples)
    assert [k for k, c in keys.items() if c > 1] == []
    # nothing templated: no vec or hyde sentence is reused across rows
    lines = Counter(t.lower() for ex in examples for k, t in ex.output if k in ("vec", "hyde"))
    assert [t for t, c in lines.items() if c > 1] == []


def test_every_row_has_a_known_category_and_all_categories_are_covered(examples):
    cats = Counter(ex.category for ex in examples)
    assert set(cats) == CATEGORIES
    assert min(cats.values()) >= 50, cats


def test_reward_floors(figures):
    assert figures["reward"]["mean"] >= 0.85
    assert figures["reward"]["excellent_fraction"] >= 0.90
    assert figures["query_words"]["short_fraction"] >= 0.15
    assert figures["hyde_fraction"] >= 0.70


def test_row_shape(examples):
    for ex in examples:
        kinds = ex.kinds()
        assert kinds.get("hyde", 0) <= 1 and 2 <= kinds["lex"] <= 3 and 2 <= kinds["vec"] <= 3, ex.query
        for kind, text in ex.output:
            if kind == "hyde":
                assert 50 <= text_width(text) <= 200, ex.query  # the reward's measure: CJK characters count double


def test_eval_queries_are_held_out():
    queries = eval_queries()
    assert len(queries) >= 60 and len(set(queries)) == len(queries)
    train_norm = {normalise_query(ex.query) for ex in load_examples()}
    train_near = {near_duplicate_key(ex.query) for ex in load_examples()}
    leaked = [q for q in queries if normalise_query(q) in train_norm or near_duplicate_key(q) in train_near]
    assert leaked == []


# --- multilingual data (issue 16) -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def multilingual(examples):
    return [ex for ex in examples if ex.lang and ex.lang != "en"]


def test_multilingual_rows_cover_eight_languages(multilingual):
    langs = Counter(ex.lang for ex in multilingual)
    assert len(multilingual) >= 400
    assert {"zh", "ja", "ko", "ru", "de", "fr", "es", "pt"} <= set(langs) and min(langs.values()) >= 30, langs
    # every tagged row lives in data/multilingual_<lang>.jsonl
    for p in DEFAULT_DATA_DIR.glob("multilingual_*.jsonl"):
        assert {ex.lang for _, ex, _ in read_examples(p) if ex} == {p.stem.split("_", 1)[1]}, p
    # mixed queries: an English or product term inside a CJK or Cyrillic query
    mixed = [ex for ex in multilingual if ex.lang in ("zh", "ja", "ko", "ru") and any(t.isascii() and t.isalpha()
                                                                                      for t in tokens(ex.query))]
    assert len(mixed) >= 30


def test_multilingual_reward_floors(multilingual):
    figures = stats(multilingual)
    assert figures["reward"]["mean"] >= 0.95
    assert figures["reward"]["excellent_fraction"] >= 0.97
    for lang, f in figures["languages"].items():
        assert f["rows"] >= 30 and f["mean_reward"] >= 0.94 and f["lines_in_language"] >= 0.98, (lang, f)


def _grams(query):
    out = set()
    for t in tokens(query):
        out.update(cjk_grams(t) if is_cjk(t) else [t])
    return out


def test_multilingual_eval_queries_are_held_out():
    pairs = [(c, q) for c, q in eval_queries(with_category=True) if c.startswith("multilingual_")]
    langs = Counter(c.split("_", 1)[1] for c, _ in pairs)
    assert len(pairs) >= 40 and len(langs) >= 8 and min(langs.values()) >= 5, langs
    # CJK queries have no spaces, so the near-duplicate key sees characters; also no eval query shares most of its
    # character bigrams (CJK) and words with a training query
    train = [_grams(ex.query) for ex in load_examples() if ex.lang]
    for _, q in pairs:
        g = _grams(q)
        assert max(len(g & t) / len(g | t) for t in train) < 0.6, q
