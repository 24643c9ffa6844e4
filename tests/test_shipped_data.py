"""Floors on the shipped training data and the held-out eval queries (issue: training data)."""

from collections import Counter

import pytest

from qmd_unsloth.data import (DEFAULT_DATA_DIR, data_files, load_examples, near_duplicate_key, normalise_query,
                              read_examples, stats, validate)

CATEGORIES = {"programming", "errors_debugging", "devops", "databases", "ml_ai", "science", "howto",
              "health_fitness", "finance_legal", "travel_places", "people_orgs", "personal_notes", "temporal",
              "short_keywords", "long_questions", "quoted_phrases", "misspellings"}


@pytest.fixture(scope="module")
def examples():
    return load_examples()


@pytest.fixture(scope="module")
def figures(examples):
    return stats(examples)


def eval_queries():
    from qmd_unsloth.eval import read_queries

    return [q for _, q in read_queries(DEFAULT_DATA_DIR / "eval_queries.txt")]


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
                assert 50 <= len(text) <= 200, ex.query


def test_eval_queries_are_held_out():
    queries = eval_queries()
    assert len(queries) >= 60 and len(set(queries)) == len(queries)
    train_norm = {normalise_query(ex.query) for ex in load_examples()}
    train_near = {near_duplicate_key(ex.query) for ex in load_examples()}
    leaked = [q for q in queries if normalise_query(q) in train_norm or near_duplicate_key(q) in train_near]
    assert leaked == []
