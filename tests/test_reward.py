import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmd_unsloth.reward import MAX_POINTS, analyse_query, grpo_reward, score_expansion

GOOD = (
    "hyde: Docker volumes live under /var/lib/docker/volumes and persist data after a container is removed.\n"
    "lex: docker volumes\n"
    "lex: docker volume mount persist\n"
    "vec: how do docker volumes keep data between container restarts\n"
    "vec: difference between bind mounts and named docker volumes"
)
Q = "docker volume persistence"


def reasons(query, completion):
    return " | ".join(score_expansion(query, completion).reasons)


def test_good_expansion_is_excellent_with_full_marks():
    s = score_expansion(Q, GOOD)
    assert s.rating == "Excellent"
    assert s.score == 1.0, s.reasons
    assert {n: d.points for n, d in s.dimensions.items()} == MAX_POINTS


@pytest.mark.parametrize("completion, why", [
    ("", "empty output"),
    ("   \n\n ", "empty output"),
    ("<|im_end|>", "empty output"),
    ("<think>\n\n</think>\n\n", "empty output"),
    ("lex: docker volumes<|im_start|>assistant", "chat-template token <|im_start|>"),
    ("lex: docker volumes\n<|endoftext|>\nvec: more text here", "chat-template token <|endoftext|>"),
    ("lex: docker volumes<|im_end|><|im_end|>", "chat-template token <|im_end|>"),
    ("Here are some expansions:\nlex: docker volumes", "without a lex:/vec:/hyde: prefix"),
    ("Lex: docker volumes\nvec: how do docker volumes work", "without a lex:/vec:/hyde: prefix"),
    ("lex:docker volumes\nvec: how do docker volumes work", "without a lex:/vec:/hyde: prefix"),
    ("lex: docker volumes\n- vec: how do docker volumes work", "without a lex:/vec:/hyde: prefix"),
    ("lex: \nvec: how do docker volumes work", "without a lex:/vec:/hyde: prefix"),
    ("<think>unclosed\nlex: docker volumes", "without a lex:/vec:/hyde: prefix"),
])
def test_hard_failures_score_zero(completion, why):
    s = score_expansion(Q, completion)
    assert s.score == 0.0 and s.rating == "Failed"
    assert why in s.hard_failure


@pytest.mark.parametrize("end", ["<|im_end|>", "<|endoftext|>", "\n<|im_end|>\n"])
def test_one_trailing_end_token_is_stripped(end):
    assert score_expansion(Q, GOOD + end).score == score_expansion(Q, GOOD).score == 1.0


def test_empty_think_block_is_free_and_nonempty_think_costs_heavily():
    assert score_expansion(Q, "<think>\n\n</think>\n\n" + GOOD).score == 1.0
    s = score_expansion(Q, "<think>The user wants docker volumes.</think>\n" + GOOD)
    assert s.dimensions["thinking"].points == 0
    assert s.score == pytest.approx(0.8)
    assert "non-empty <think> block" in reasons(Q, "<think>x</think>\n" + GOOD)


@pytest.mark.parametrize("completion, dim, expected", [
    ("vec: how do docker volumes persist data\nvec: where docker stores volume data", "format", "no lex line"),
    ("lex: docker volumes\nlex: docker volume mount", "format", "no vec line"),
    (GOOD + "\nlex: docker volume ls\nlex: docker volume prune", "format", "4 lex lines (at most 3)"),
    (GOOD + "\nvec: can docker volumes be shared\nvec: how to back up docker volumes", "format", "4 vec lines"),
    (GOOD + "\nhyde: Named volumes are managed by Docker and survive container removal entirely.", "format",
     "2 hyde lines"),
    ("lex: docker volumes\nhyde: Docker volumes persist data under /var/lib/docker/volumes on the host.\n"
     "vec: how do docker volumes keep data", "format", "hyde is not the first line"),
])
def test_format_rules(completion, dim, expected):
    s = score_expansion(Q, completion)
    assert any(expected in d for d in s.dimensions[dim].deductions), s.reasons


def test_diversity_rules():
    assert "only repeat the query" in reasons(Q, GOOD.replace("lex: docker volumes\n", "lex: docker volume persistence\n"))
    dup = GOOD.replace("lex: docker volume mount persist", "lex: docker volumes")
    assert "1 duplicated line(s)" in reasons(Q, dup)
    near = GOOD.replace("vec: difference between bind mounts and named docker volumes",
                        "vec: how do the docker volumes keep data between container restarts")
    assert "nearly identical vec lines" in reasons(Q, near)
    reorder = GOOD.replace("vec: difference between bind mounts and named docker volumes",
                           "vec: persistence volume docker")
    assert "only reorder the query" in reasons(Q, reorder)


def test_echo_cap_is_one_number_for_reward_and_rating():
    echo = "lex: docker volume persistence\nvec: docker volume persistence\nvec: Docker volume persistence?"
    s = score_expansion(Q, echo)
    assert s.score <= 0.35 and s.rating in ("Poor", "Failed")
    assert any("echo cap" in r for r in s.reasons)
    assert grpo_reward([echo], query=[Q]) == [s.score]


@pytest.mark.parametrize("hyde, expected", [
    (None, "no hyde passage"),
    ("Docker volumes persist.", "fewer than 50"),
    ("Docker volumes persist data " + "and keep state on the host filesystem " * 6, "more than 200"),
    ("Docker volumes volumes volumes volumes keep docker volume data data data data safe forever.", "repeats words"),
    ("Bind mounts map a host directory into a container path at a fixed location.", "shares no term"),
])
def test_hyde_rules(hyde, expected):
    body = GOOD.split("\n", 1)[1]
    completion = body if hyde is None else f"hyde: {hyde}\n{body}"
    assert expected in reasons(Q, completion)


def test_quality_rules():
    long_lex = GOOD.replace("lex: docker volume mount persist", "lex: docker volume mount persist data across restarts")
    assert "over 5 terms" in reasons(Q, long_lex)
    question = GOOD.replace("lex: docker volume mount persist", "lex: how do docker volumes persist?")
    assert "read as a question" in reasons(Q, question)
    short_vec = GOOD.replace("vec: difference between bind mounts and named docker volumes", "vec: docker volumes")
    assert "under 3 words" in reasons(Q, short_vec)
    filler = GOOD.replace("vec: difference between bind mounts and named docker volumes",
                          "vec: find information about docker volumes")
    assert "generic filler" in reasons(Q, filler)
    dropped = GOOD.replace("lex: docker volume mount persist", "lex: bind mounts tmpfs")
    assert "1 line(s) without any of the query's terms ['docker', 'volume', 'persistence'] (QMD drops them)" in \
        reasons(Q, dropped)
    inverted = ("lex: docker volumes keep data after the container is gone\nlex: docker volume data stays on host\n"
                "vec: docker volumes\nvec: docker volume data")
    assert "lex lines are not shorter than vec lines" in reasons(Q, inverted)


def test_misspelled_and_inflected_terms_still_count_as_query_terms():
    q = "kubernets deploymnt"
    c = ("lex: kubernetes deployment\nlex: kubernetes rollout\n"
         "vec: how do I create a kubernetes deployment\nvec: rolling out new pods in kubernetes")
    r = reasons(q, c)
    assert "share no content term" not in r  # the corrected spelling is on topic ...
    assert "4 line(s) without any of the query's terms ['kubernets', 'deploymnt'] (QMD drops them)" in r  # ... but
    # QMD keeps a line only when it contains a query term verbatim, so a line that keeps the typo survives
    assert "QMD drops" not in reasons(q, c.replace("lex: kubernetes rollout", "lex: kubernetes rollout kubernets")
                                      .replace("kubernetes deployment", "kubernets deployment").replace(
                                          "rolling out", "kubernets rolling out"))


@pytest.mark.parametrize("a, b, close", [("recieve", "receive", True), ("kubernets", "kubernetes", True),
                                         ("pyhton", "python", True), ("go", "google", False), ("java", "javascript", True),
                                         ("docker", "podman", False)])
def test_term_closeness(a, b, close):
    from qmd_unsloth.reward import _close, _edit_distance

    assert _close(a, b) is close
    assert _edit_distance("recieve", "receive", 2) == 1  # a transposition is one edit


def test_entities_must_survive_in_lex_lines():
    q = "AWS S3 lifecycle rules"
    ok = ("lex: AWS S3 lifecycle\nlex: AWS S3 expiration rules\n"
          "vec: how do I configure lifecycle rules on an AWS S3 bucket\nvec: moving old S3 objects to glacier")
    assert score_expansion(q, ok).dimensions["entities"].points == 10
    missing = ok.replace("lex: AWS S3 lifecycle\nlex: AWS S3 expiration rules", "lex: bucket lifecycle\nlex: S3 rules")
    r = reasons(q, missing)
    assert "entity 'aws' missing from every lex line" in r
    assert "entity 's3' missing from 1 lex line(s)" in r


@pytest.mark.parametrize("query, entities", [
    ("node.js streams", ("node.js",)),
    ("C++ templates", ("c++",)),
    ("React useEffect cleanup", ("react", "useeffect")),
    ("PostgreSQL vacuum", ("postgresql",)),
    ("what is RAG", ("rag",)),
    ("Shopify news 2025", ("shopify", "2025")),
    ("TDS motorsports", ("tds",)),  # no chaining of the ordinary word that follows
    ("How to use React hooks", ("react",)),  # a capitalised question word is not an entity
    ("Setting up k8s", ("k8s",)),
    ("google cloud run", ()),
])
def test_entity_extraction(query, entities):
    assert analyse_query(query).entities == entities


def test_entity_matching_is_by_token_not_substring():
    q = "Go modules"
    c = ("lex: google modules\nlex: golang modules proxy\nvec: how do modules work in golang projects\n"
         "vec: managing dependencies with modules in go")
    assert "entity 'go' missing from every lex line" in reasons(q, c)


def test_quotes_do_not_break_term_matching():
    q = '"go modules" proxy'
    c = ("lex: go modules proxy\nlex: GOPROXY go modules\nvec: how does the go modules proxy work\n"
         "vec: configuring a private proxy for go modules")
    s = score_expansion(q, c)
    assert "QMD drops" not in " ".join(s.reasons)
    # quotes are folded for echo detection too: "go modules proxy" is the query itself
    assert s.dimensions["diversity"].deductions == ["-4 1 line(s) only repeat the query"], s.reasons


def test_grpo_reward_takes_the_query_column_and_conversational_completions():
    out = grpo_reward([GOOD, [{"role": "assistant", "content": GOOD}], "junk"], query=[Q, Q, Q], prompts=["p"] * 3)
    assert out == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="query"):
        grpo_reward([GOOD])


def test_reward_import_does_not_import_torch():
    code = "import sys, qmd_unsloth.reward; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_cli_scores_a_file_and_selftest(tmp_path):
    from tests.conftest import run_module

    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"query": Q, "completion": GOOD}) + "\n\n" +
                 json.dumps({"query": Q, "completion": "nope"}) + "\n")
    r = run_module("qmd_unsloth.reward", str(f))
    assert r.returncode == 0, r.stderr
    assert "2 rows, mean score 0.500; Excellent 1" in r.stdout and "Failed 1" in r.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": 1}\n')
    r = run_module("qmd_unsloth.reward", str(bad))
    assert r.returncode == 1 and f"{bad}:1:" in r.stderr and "Traceback" not in r.stderr
    r = run_module("qmd_unsloth.reward", "--selftest")
    assert r.returncode == 0 and "Excellent" in r.stdout and "Failed" in r.stdout


@settings(max_examples=300, deadline=None)
@given(st.text(), st.text())
def test_never_raises_and_stays_in_range(query, completion):
    s = score_expansion(query, completion)
    assert 0.0 <= s.score <= 1.0
    assert s.rating in ("Excellent", "Good", "Acceptable", "Poor", "Failed")


line_text = st.text(alphabet=st.characters(blacklist_characters="\n\r", blacklist_categories=("Cs",)), min_size=1)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60), st.lists(st.tuples(st.sampled_from(["lex", "vec", "hyde"]), line_text), max_size=12))
def test_well_formed_lines_never_raise(query, pairs):
    s = score_expansion(query, "\n".join(f"{k}: {t}" for k, t in pairs))
    assert 0.0 <= s.score <= 1.0


@pytest.mark.parametrize("completion", [
    "lex: " + "docker " * 150_000,
    "hyde: " + "x" * 1_000_000,
    "\n".join(["vec: how do docker volumes work"] * 50_000),
    "<think>" + "a" * 1_000_000 + "</think>\nlex: docker volumes",
])
def test_one_megabyte_inputs(completion):
    s = score_expansion("docker volumes " * 1000, completion)
    assert 0.0 <= s.score <= 1.0


def test_non_string_inputs_do_not_raise():
    assert score_expansion(None, None).score == 0.0
    assert score_expansion(123, b"lex: x").score == 0.0
