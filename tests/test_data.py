import json

import pytest

from qmd_unsloth.data import (DataError, is_val, load_examples, near_duplicate_key, normalise_query, split,
                              validate)
from tests.conftest import run_module

ROW = {"query": "docker volumes", "category": "devops",
       "output": [["hyde", "Docker volumes persist data under /var/lib/docker/volumes on the host machine."],
                  ["lex", "docker volumes"], ["vec", "how do docker volumes persist data"]]}


def write(tmp_path, name, lines):
    p = tmp_path / name
    p.write_bytes(b"\n".join(l if isinstance(l, bytes) else l.encode() for l in lines) + b"\n")
    return p


BAD_LINES = [
    ('{"query": "x", "output": [["lex", "a b"]]', "bad JSON"),
    ('["lex", "a"]', "not a JSON object"),
    ('{"output": [["lex", "a b"]]}', "query: missing"),
    ('{"query": "  ", "output": [["lex", "a b"]]}', "query: empty"),
    ('{"query": 3, "output": [["lex", "a b"]]}', "query: must be a string"),
    ('{"query": "x", "output": [["bm25", "a b"]]}', "output[0]: unknown kind 'bm25'"),
    ('{"query": "x", "output": [["lex", "  "]]}', "output[0]: empty lex text"),
    ('{"query": "x", "output": [["lex", "a", "b"]]}', "output[0]: must be a [kind, text] pair"),
    ('{"query": "x", "output": ["lex: a"]}', "output[0]: must be a [kind, text] pair"),
    ('{"query": "x", "output": []}', "output: must be a non-empty list"),
    ('{"query": "x"}', "output: missing"),
    (b'{"query": "caf\xe9", "output": [["lex", "a"]]}', "not UTF-8"),
    ('{"query": "x", "lang": "DE", "output": [["lex", "a b"]]}', 'lang: "DE" is not a two-letter lowercase ISO 639-1'),
    ('{"query": "x", "lang": "xx", "output": [["lex", "a b"]]}', 'lang: "xx" is not'),
    ('{"query": "x", "lang": "deu", "output": [["lex", "a b"]]}', 'lang: "deu" is not'),
    ('{"query": "x", "lang": 7, "output": [["lex", "a b"]]}', "lang: 7 is not"),
]


def test_validate_reports_every_bad_line_with_path_and_line(tmp_path):
    lines = [json.dumps(ROW), ""] + [l for l, _ in BAD_LINES]
    p = write(tmp_path, "bad.jsonl", lines)
    errors, good = validate([p])
    assert good == 1
    assert len(errors) == len(BAD_LINES)
    for err, (_, why), lineno in zip(errors, BAD_LINES, range(3, 3 + len(BAD_LINES))):
        assert err.startswith(f"{p}:{lineno}: ") and why in err, err


def test_validate_cli_exit_codes_and_no_traceback(tmp_path):
    good = write(tmp_path, "good.jsonl", [json.dumps(ROW), "", "  "])
    r = run_module("qmd_unsloth.data", "validate", str(good))
    assert r.returncode == 0 and r.stdout == ""
    bad = write(tmp_path, "bad.jsonl", [l for l, _ in BAD_LINES])
    missing = tmp_path / "missing.jsonl"
    r = run_module("qmd_unsloth.data", "validate", str(good), str(bad), str(missing))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    out = r.stdout.splitlines()
    assert len(out) == len(BAD_LINES) + 1
    assert out[-1] == f"{missing}: file not found"


def test_load_dedupes_by_normalised_query_and_raises_on_bad_data(tmp_path):
    other = dict(ROW, query="Docker   Volumes?")
    p = write(tmp_path, "a.jsonl", [json.dumps(ROW), json.dumps(other), json.dumps(dict(ROW, query="docker networks"))])
    assert [e.query for e in load_examples([p])] == ["docker volumes", "docker networks"]
    assert len(load_examples([p], dedupe=False)) == 3
    bad = write(tmp_path, "b.jsonl", ['{"query": ""}'])
    with pytest.raises(DataError, match="b.jsonl:1: query: empty"):
        load_examples([p, bad])


def test_normalisation_and_near_duplicate_keys():
    assert normalise_query("  Docker  VOLUMES? ") == normalise_query("docker volumes")
    assert near_duplicate_key("the docker volumes") == near_duplicate_key("volume docker")
    assert near_duplicate_key("docker volumes") != near_duplicate_key("docker networks")


def test_split_is_deterministic_seeded_and_stable_when_rows_are_added():
    queries = [f"query number {i}" for i in range(2000)]
    vals = {q for q in queries if is_val(q)}
    assert 60 < len(vals) < 140  # ~5%
    assert vals == {q for q in queries if is_val(q)}
    assert vals != {q for q in queries if is_val(q, seed=7)}
    assert {q for q in queries[:1000] if is_val(q)} == {q for q in vals if q in set(queries[:1000])}


def test_prepare_writes_prompt_completion_rows(tmp_path):
    rows = [json.dumps(dict(ROW, query=f"docker volumes case {i}")) for i in range(60)]
    data = write(tmp_path, "d.jsonl", rows)
    out = tmp_path / "prepared"
    r = run_module("qmd_unsloth.data", "prepare", str(data), "--out", str(out), "--val-fraction", "0.2")
    assert r.returncode == 0, r.stderr
    train = [json.loads(l) for l in (out / "train.jsonl").read_text().splitlines()]
    val = [json.loads(l) for l in (out / "val.jsonl").read_text().splitlines()]
    assert len(train) + len(val) == 60 and 3 < len(val) < 25
    meta = json.loads((out / "prepare.json").read_text())
    assert meta["train"] == len(train) and len(meta["data_hash"]) == 64
    row = train[0]
    assert set(row) == {"query", "category", "lang", "target", "prompt", "completion"}
    assert row["prompt"].startswith("<|im_start|>system\nYou are a helpful, respectful and honest assistant.")
    assert row["prompt"].endswith("<|im_start|>assistant\n") and "<think>" not in row["prompt"]
    assert row["completion"] == row["target"] + "<|im_end|>" and row["target"].endswith("\n")
    assert row["target"].startswith("hyde: ")
    assert not list(out.glob(".*tmp"))  # nothing half-written left behind


def test_prepare_on_bad_data_is_a_clean_error(tmp_path):
    bad = write(tmp_path, "bad.jsonl", ['{"query": "x", "output": [["foo", "a"]]}'])
    r = run_module("qmd_unsloth.data", "prepare", str(bad), "--out", str(tmp_path / "o"))
    assert r.returncode == 1 and f"{bad}:1: output[0]: unknown kind 'foo'" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "o" / "train.jsonl").exists()


def test_stats_prints_counts_and_reward_distribution(tmp_path):
    weak = dict(ROW, query="kubernetes ingress", output=[["lex", "kubernetes ingress"]])
    data = write(tmp_path, "d.jsonl", [json.dumps(ROW), json.dumps(weak), json.dumps(ROW)])
    js = tmp_path / "stats.json"
    r = run_module("qmd_unsloth.data", "stats", str(data), "--json", str(js))
    assert r.returncode == 0, r.stderr
    assert "rows: 2 (exact duplicates removed: 1" in r.stdout
    assert "devops" in r.stdout and "<= 2 words: 2 (100.0%)" in r.stdout
    assert "'kubernetes ingress'" in r.stdout  # the weak row is listed with its reasons
    st = json.loads(js.read_text())
    assert st["reward"]["ratings"]["Excellent"] == 1 and st["hyde_fraction"] == 0.5


def test_data_module_import_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, qmd_unsloth.data; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_split_function_partitions(tmp_path):
    p = write(tmp_path, "a.jsonl", [json.dumps(dict(ROW, query=f"q {i}")) for i in range(100)])
    ex = load_examples([p])
    train, val = split(ex)
    assert len(train) + len(val) == 100 and not {e.query for e in train} & {e.query for e in val}


ZH = {"query": "容器 网络 配置", "lang": "zh",
      "output": [["hyde", "Docker 默认创建 bridge 网络，容器之间可以通过容器名互相访问；自定义网络用 docker network create 创建。"],
                 ["lex", "容器 网络"], ["lex", "网络 配置 bridge"],
                 ["vec", "如何配置 Docker 容器之间的网络通信"], ["vec", "自定义容器网络和默认 bridge 网络有什么区别"]]}
ZH_EN = {"query": "容器 日志 查看", "lang": "zh",
         "output": [["lex", "container logs"], ["lex", "docker logs tail"],
                    ["vec", "how do I read the logs of a container"], ["vec", "where are docker container logs stored"]]}


def test_lang_field_and_stats_per_language(tmp_path):
    p = write(tmp_path, "ml.jsonl", [json.dumps(ROW), json.dumps(ZH, ensure_ascii=False),
                                     json.dumps(ZH_EN, ensure_ascii=False)])
    examples = load_examples([p])
    assert [ex.lang for ex in examples] == [None, "zh", "zh"]
    assert [ex.language for ex in examples] == ["en", "zh", "zh"]
    r = run_module("qmd_unsloth.data", "stats", str(p), "--json", str(tmp_path / "st.json"))
    assert r.returncode == 0, r.stderr
    langs = json.loads((tmp_path / "st.json").read_text())["languages"]
    assert list(langs) == ["zh", "en"] and langs["zh"]["rows"] == 2 and langs["en"]["rows"] == 1
    assert langs["zh"]["excellent_fraction"] == 0.5 and langs["zh"]["lines_in_language"] == 0.5556  # 5 of 9 lines
    assert langs["zh"]["mean_reward"] < 0.7 and langs["en"]["excellent_fraction"] == 1.0
    assert "by language" in r.stdout and "zh       2  mean reward" in r.stdout
    # prepare keeps working and carries the tag for the GRPO reward
    r = run_module("qmd_unsloth.data", "prepare", str(p), "--out", str(tmp_path / "prep"), "--val-fraction", "0")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(l) for l in (tmp_path / "prep" / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["lang"] for r in rows] == ["en", "zh", "zh"] and "容器 网络 配置" in rows[1]["prompt"]


def test_near_duplicate_key_folds_cjk_spacing():
    assert near_duplicate_key("容器网络") == near_duplicate_key("网络 容器")
    assert near_duplicate_key("Docker 容器网络") == near_duplicate_key("docker 网络容器")
    assert near_duplicate_key("容器网络") != near_duplicate_key("容器日志")
