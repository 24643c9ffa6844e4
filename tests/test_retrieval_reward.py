"""The retrieval reward: the same ranking as `bench retrieval`, gains against the raw query, weights in GRPO."""

import json

import pytest

from qmd_unsloth import config as C
from qmd_unsloth.retrieval import load_collection
from tests.conftest import run_module
from tests.test_bench import make_collection

pytest.importorskip("sentence_transformers")

GOOD = {  # query text -> an expansion that names the judged documents' own words
    "k8s pod crashing over and over": "hyde: CrashLoopBackOff means the kubelet waits before restarting a crashing "
    "container.\nlex: CrashLoopBackOff kubelet\nlex: pod restart\nvec: why does my kubernetes pod keep restarting",
    "lisbon tram": "lex: 28 tram\nvec: tram 28 timetable through Alfama",
}


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    return make_collection(tmp_path_factory.mktemp("col") / "c")


@pytest.mark.parametrize("mode,raw_run,exp_run", [("hybrid", "hybrid", "hybrid+expansions"),
                                                  ("bm25", "bm25", "bm25+lex")])
def test_the_reward_ranks_exactly_as_bench_retrieval(collection, tmp_path, mode, raw_run, exp_run):
    from qmd_unsloth.retrieval_reward import RetrievalReward

    col = load_collection(collection)
    exp = tmp_path / "exp.jsonl"
    exp.write_text("".join(json.dumps({"id": qid, "query": q, "completion": GOOD[q]}) + "\n"
                           for qid, q in col.queries.items()))
    r = run_module("qmd_unsloth.bench", "retrieval", "--collection", str(collection), "--expansions", str(exp),
                   "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr[-2000:]
    bench = json.loads((tmp_path / "out" / "retrieval.json").read_text())["metrics"]

    reward = RetrievalReward(collection, mode=mode, cache_dir=tmp_path / "emb")
    pairs = [reward.scores(q, GOOD[q]) for q in col.queries.values()]
    raw = sum(p[0] for p in pairs) / len(pairs)
    expanded = sum(p[1] for p in pairs) / len(pairs)
    # bench computes nDCG with ir-measures over the same rankings; the reward's own nDCG must agree
    assert raw == pytest.approx(bench[raw_run]["ndcg@10"], abs=1e-4)
    assert expanded == pytest.approx(bench[exp_run]["ndcg@10"], abs=1e-4)


def test_gain_is_relative_to_the_raw_query_and_none_without_judgments(collection, tmp_path):
    from qmd_unsloth.retrieval_reward import RetrievalReward

    reward = RetrievalReward(collection, mode="bm25")
    q = "k8s pod crashing over and over"
    # QMD ANDs the raw query's terms: no note holds all five, so the raw ranking is empty; a lex line finds d1
    assert reward.gain(q, "lex: pod restart\nvec: pod keeps crashing") > 0
    # QMD drops a line that holds no query word (CrashLoopBackOff kubelet), so it cannot help, however apt
    assert reward.gain(q, "lex: CrashLoopBackOff kubelet\nvec: pod keeps crashing") == 0
    assert reward.gain(q, "lex: sourdough starter\nvec: why is my bread dense") <= 0
    assert reward.gain("a query nobody judged", "lex: anything") is None
    assert reward(["lex: 28 tram", "lex: sourdough"], query=["lisbon tram", "unjudged"]) [1] is None


def test_trec_qrels_file_replaces_the_judgments_and_bad_paths_are_one_line(collection, tmp_path):
    from qmd_unsloth.retrieval_reward import RetrievalReward, RetrievalRewardError

    qrels = tmp_path / "q.txt"
    qrels.write_text("2 0 d2 1\n")
    reward = RetrievalReward(collection, qrels=qrels, mode="bm25")
    assert not reward.has_judgments("k8s pod crashing over and over") and reward.has_judgments("lisbon tram")
    with pytest.raises(RetrievalRewardError, match="qrels file not found"):
        RetrievalReward(collection, qrels=tmp_path / "missing.txt", mode="bm25")
    with pytest.raises(RetrievalRewardError, match="collection folder not found"):
        RetrievalReward(tmp_path / "nowhere", mode="bm25")
    qrels.write_text("2 0 d2\n")
    with pytest.raises(RetrievalRewardError, match=r"q.txt:1: expected"):
        RetrievalReward(collection, qrels=qrels, mode="bm25")


def test_grpo_cli_rejects_a_bad_collection_in_one_line(tiny_model, tmp_path):
    r = run_module("qmd_unsloth.grpo", "--sft-model", str(tiny_model), "--retrieval-weight", "0.5",
                   "--retrieval-collection", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path), "--use-cpu")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "collection folder not found" in r.stderr
    r = run_module("qmd_unsloth.grpo", "--retrieval-weight", "0.5", "--dry-run")
    assert r.returncode == 2 and "retrieval_weight: > 0 needs retrieval_collection" in r.stderr


def test_grpo_sums_the_rule_and_retrieval_rewards_with_the_configured_weights(tiny_model, collection, tmp_path):
    from qmd_unsloth import grpo

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# category: tiny\nk8s pod crashing over and over\nlisbon tram\n")
    cfg = C.load(C.GRPOConfig, None, sft_model=str(tiny_model), prompts=prompts, output_dir=tmp_path,
                 run_name="g", max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=1,
                 num_generations=2, max_completion_length=16, logging_steps=1, save_steps=2, use_cpu=True, backend="hf", report_to=[],
                 rules_weight=1.0, retrieval_weight=0.5, retrieval_collection=collection, retrieval_mode="bm25")
    funcs, weights = grpo.reward_functions(cfg)
    assert weights == [1.0, 0.5] and funcs[1].__name__ == "retrieval_bm25_ndcg10_gain"
    merged = grpo.run(cfg)
    logged = [h for h in json.loads((merged.parent / "metrics.json").read_text())["log_history"] if "reward" in h]
    assert logged
    for h in logged:
        rules = h["rewards/qmd_expansion_reward/mean"]
        retrieval = h["rewards/retrieval_bm25_ndcg10_gain/mean"]
        assert h["reward"] == pytest.approx(1.0 * rules + 0.5 * retrieval, abs=1e-4)
    rows = [json.loads(l) for l in (merged.parent / "data" / "prompts.jsonl").read_text().splitlines()]
    assert [r["query"] for r in rows] == ["k8s pod crashing over and over", "lisbon tram"]


def test_the_gain_is_clipped_and_several_collections_route_each_query_to_its_judge(collection, tmp_path):
    from qmd_unsloth.retrieval_reward import CombinedRetrievalReward, RetrievalReward, combined

    q = "k8s pod crashing over and over"
    full = RetrievalReward(collection, mode="bm25").gain(q, "lex: pod restart\nvec: pod keeps crashing")
    assert full > 0.2
    clipped = RetrievalReward(collection, mode="bm25", clip=0.2)
    assert clipped.gain(q, "lex: pod restart\nvec: pod keeps crashing") == pytest.approx(0.2)
    assert clipped.gain(q, "lex: sourdough starter") >= -0.2
    # a second collection that judges only "lisbon tram": each query goes to the first collection that judges it
    only_tram = tmp_path / "q.txt"
    only_tram.write_text("2 0 d2 1\n")
    a = RetrievalReward(collection, qrels=only_tram, mode="bm25")
    b = RetrievalReward(collection, mode="bm25")
    both = combined([a, b])
    assert isinstance(both, CombinedRetrievalReward) and combined([b]) is b
    assert both.gain(q, "lex: pod restart") == b.gain(q, "lex: pod restart")  # a does not judge it: b does
    assert both(["lex: 28 tram", "lex: x"], query=["lisbon tram", "unjudged"]) == [a.gain("lisbon tram", "lex: 28 tram"),
                                                                                  None]
