"""Training rows from Hugging Face datasets (qmd_unsloth.hf_data): real datasets built here (parquet through pyarrow,
save_to_disk, JSONL), mapped by columns, checked by the same row validator as data/*.jsonl, with one-line errors.
The hub cannot be reached from this machine: where a hub id is tested, a dataset placed in a temporary Hugging Face
cache (the layout `hf download --repo-type dataset` writes) stands in for it, and the test says so."""

import json

import pytest

pytest.importorskip("datasets")
pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

from qmd_unsloth import config as C  # noqa: E402
from qmd_unsloth.data import load_examples, read_examples, validate  # noqa: E402
from qmd_unsloth.hf_data import DatasetSourceError, HFDataset, examples  # noqa: E402
from tests.conftest import run_module  # noqa: E402

ROWS = [  # query, hyde, lex lines, vec lines, lang
    ("docker volumes sichern", "Ein Docker Volume sichert man mit einem temporären Container, der ein tar-Archiv "
     "schreibt.", ["docker volume backup tar", "docker volumes sichern"],
     ["wie sichere ich ein docker volume auf den host"], "de"),
    ("nginx reload", None, ["nginx reload config", "nginx -s reload"],
     ["how do I reload nginx without dropping connections", "difference between nginx reload and restart"], None),
    ("jwt expiry", "A JWT's exp claim holds the expiry as seconds since the epoch; servers reject tokens past it.",
     ["jwt exp claim", "jwt token expiry"], ["how long should a jwt access token live"], None),
]


def _pairs(hyde, lex, vec):
    return tuple([("hyde", hyde)] if hyde else []) + tuple(("lex", x) for x in lex) + tuple(("vec", x) for x in vec)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same rows in the three local forms a user keeps them in."""
    from datasets import Dataset, DatasetDict

    d = tmp_path_factory.mktemp("hf")
    # parquet: separate columns per kind, our fields under other names
    pq.write_table(pa.table({"question": [r[0] for r in ROWS], "passage": [r[1] for r in ROWS],
                             "keywords": [r[2] for r in ROWS], "questions": [r[3] for r in ROWS],
                             "language": [r[4] for r in ROWS]}), d / "rows.parquet")
    # save_to_disk: our schema, the answer as a list of {"kind", "text"} objects, a train and a test split
    records = [{"query": q, "output": [{"kind": k, "text": t} for k, t in _pairs(h, lx, v)], "lang": lang}
               for q, h, lx, v, lang in ROWS]
    DatasetDict({"train": Dataset.from_list(records), "test": Dataset.from_list(records[:1])}).save_to_disk(d / "disk")
    # JSONL: a text column of "kind: text" lines, as the model writes them
    (d / "rows.jsonl").write_text("".join(json.dumps({"q": q, "completion": "".join(f"{k}: {t}\n" for k, t in
                                                                                   _pairs(h, lx, v))}) + "\n"
                                          for q, h, lx, v, _ in ROWS))
    return d


SPECS = {
    "parquet": lambda d: HFDataset(source=str(d / "rows.parquet"), columns={
        "query": "question", "hyde": "passage", "lex": "keywords", "vec": "questions", "lang": "language"}),
    "save_to_disk": lambda d: HFDataset(source=str(d / "disk")),
    "jsonl": lambda d: HFDataset(source=str(d / "rows.jsonl"), columns={"query": "q", "text": "completion"}),
}


@pytest.mark.parametrize("form", sorted(SPECS))
def test_each_local_form_maps_into_the_schema(sources, form):
    spec = SPECS[form](sources)
    good, errors = examples(spec)
    assert errors == []
    assert [(ex.query, ex.output) for ex in good] == [(q, _pairs(h, lx, v)) for q, h, lx, v, _ in ROWS]
    if form != "jsonl":  # the JSONL form carries no language column
        assert [ex.lang for ex in good] == [r[4] for r in ROWS]


def test_datasets_come_beside_the_jsonl_files_and_dedupe_across_them(sources, tmp_path):
    own = tmp_path / "own.jsonl"
    own.write_text(json.dumps({"query": "nginx reload", "output": [["lex", "nginx reload"],
                                                                   ["vec", "how to reload nginx"]]}) + "\n"
                   + json.dumps({"query": "git stash pop", "output": [["lex", "git stash pop conflict"],
                                                                      ["vec", "how to undo a git stash pop"]]}) + "\n")
    rows = load_examples([own], datasets=[SPECS["parquet"](sources)])
    assert [ex.query for ex in rows] == ["nginx reload", "git stash pop", "docker volumes sichern", "jwt expiry"]
    assert rows[0].output == (("lex", "nginx reload"), ("vec", "how to reload nginx"))  # the file's row came first
    # with datasets, data: [] means the datasets alone
    assert len(load_examples([], datasets=[SPECS["parquet"](sources)])) == 3


def test_bad_rows_are_reported_like_jsonl_lines_naming_source_row_field_and_column(sources, tmp_path):
    from datasets import Dataset

    bad = [{"question": "ok query", "out": [["lex", "ok query words"], ["vec", "what is an ok query"]]},
           {"question": "", "out": [["lex", "x"]]},
           {"question": "kinds", "out": [["lex", "kinds"], ["summary", "x"]]},
           {"question": "two lines", "out": [["hyde", "first line\nsecond line"]]}]
    Dataset.from_list(bad).save_to_disk(tmp_path / "bad")
    spec = HFDataset(source=str(tmp_path / "bad"), columns={"query": "question", "output": "out"})
    errors, good = validate([], [spec])
    label = f"{tmp_path / 'bad'}[train]"
    assert good == 1 and errors == [
        f"{label}:2: query: empty (column 'question')",
        f"{label}:3: output[1]: unknown kind 'summary' (expected lex, vec or hyde) (column 'out')",
        f"{label}:4: output[0]: hyde text spans several lines (column 'out')"]
    # the same reasons as the JSONL validator gives for the same rows
    j = tmp_path / "bad.jsonl"
    j.write_text("".join(json.dumps({"query": r["question"], "output": r["out"]}) + "\n" for r in bad))
    assert [e for _, _, e in read_examples(j)][1:] == [e.split(": ", 1)[1].rsplit(" (column", 1)[0]
                                                       for e in errors]
    r = run_module("qmd_unsloth.data", "validate", "--dataset", str(tmp_path / "bad"), "--column", "query=question",
                   "--column", "output=out")
    assert r.returncode == 1 and r.stdout.splitlines() == errors
    assert r.stderr.strip().splitlines() == ["error: 1 good rows, 3 problem(s)"]


@pytest.mark.parametrize("spec, message", [
    (lambda d: HFDataset(source=str(d / "rows.parquet")), "rows.parquet[train]: no column 'query' for query "
     "(columns: question, passage, keywords, questions, language); map it"),
    (lambda d: HFDataset(source=str(d / "disk"), split="validation"), "disk: no split 'validation' (splits: train, "
     "test)"),
    (lambda d: HFDataset(source=str(d / "nope.parquet")), "nope.parquet: no such file or folder"),
])
def test_a_dataset_that_cannot_be_used_is_one_line(sources, spec, message):
    s = spec(sources)
    with pytest.raises(DatasetSourceError) as e:
        examples(s)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_null_in_a_mapped_kind_column_is_no_line(sources):
    good, errors = examples(HFDataset(source=str(sources / "rows.parquet"), columns={
        "query": "question", "hyde": "passage", "lex": "keywords", "vec": "questions"}))
    assert errors == [] and [ex.kinds()["hyde"] for ex in good] == [1, 0, 1]  # row 2 has no passage


def test_a_mapping_that_names_no_field_or_two_answer_forms_is_refused_at_config_time(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("hf_datasets:\n  - source: me/rows\n    columns: {query: q, output: o, lex: k}\n")
    with pytest.raises(C.ConfigError, match="c.yaml: hf_datasets: columns: map the answer from one of output, "
                                            "hyde/lex/vec or text, not several"):
        C.load(C.SFTConfig, y)
    y.write_text("hf_datasets: [me/rows]\n")  # a plain string is the source
    assert C.load(C.SFTConfig, y).hf_datasets[0].source == "me/rows"


def test_offline_without_the_cached_dataset_is_one_line(tmp_path):
    r = run_module("qmd_unsloth.data", "validate", "--dataset", "nobody/no-such-rows",
                   env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: nobody/no-such-rows: dataset not in the local Hugging Face cache and HF_HUB_OFFLINE=1 is set; "
        "download it first (hf download nobody/no-such-rows --repo-type dataset) or pass a save_to_disk folder or "
        "parquet/JSONL files"]


def test_a_hub_id_loads_offline_from_the_local_cache(tmp_path):
    """STAND-IN FOR THE HUB: the dataset repository `me/qmd-rows` is written into a temporary Hugging Face cache in
    the layout `hf download me/qmd-rows --repo-type dataset` leaves (refs/main naming a snapshot folder holding the
    repo's files); the hub itself is never contacted (HF_HUB_OFFLINE=1)."""
    home = tmp_path / "hf"
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = home / "hub" / "datasets--me--qmd-rows"
    (repo / "snapshots" / rev / "data").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    pq.write_table(pa.table({"question": [r[0] for r in ROWS],
                             "expansions": [[list(p) for p in _pairs(h, lx, v)] for _, h, lx, v, _ in ROWS]}),
                   repo / "snapshots" / rev / "data" / "train-00000-of-00001.parquet")
    env = {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    r = run_module("qmd_unsloth.data", "validate", "--dataset", "me/qmd-rows", "--column", "query=question",
                   "--column", "output=expansions", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "3 good rows, 0 problem(s)"
    r = run_module("qmd_unsloth.data", "stats", "--dataset", "me/qmd-rows", "--column", "query=question",
                   "--column", "output=expansions", env=env)
    assert r.returncode == 0 and "rows: 3 " in r.stdout, r.stderr


def test_sft_trains_on_a_dataset_and_records_it(tiny_model, sources, tmp_path):
    """A real 2-step SFT run on the parquet dataset alone (data: []); prepare.json and the data hash name it."""
    spec = {"source": str(sources / "rows.parquet"), "columns": {"query": "question", "hyde": "passage",
                                                                 "lex": "keywords", "vec": "questions"}}
    r = run_module("qmd_unsloth.sft", "--base-model", str(tiny_model), "--data", "[]", "--hf-datasets",
                   json.dumps([spec]), "--output-dir", str(tmp_path), "--run-name", "h", "--max-steps", "2",
                   "--per-device-train-batch-size", "1", "--gradient-accumulation-steps", "1", "--logging-steps", "1",
                   "--save-steps", "2", "--max-seq-length", "256", "--val-fraction", "0", "--use-cpu", "--backend",
                   "hf", "--report-to", "[]")
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "sft" / "h"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train_rows"] == 3 and metrics["global_step"] == 2
    prep = json.loads((run / "data" / "prepare.json").read_text())
    assert prep["datasets"] == [f"{sources / 'rows.parquet'}[train]"] and prep["files"] == []
    rows = [json.loads(l) for l in (run / "data" / "train.jsonl").read_text().splitlines()]
    assert sorted(r["query"] for r in rows) == sorted(q for q, *_ in ROWS)
    assert C.load(C.SFTConfig, run / "config.yaml").hf_datasets[0].columns["lex"] == "keywords"
    assert json.loads((run / "data.json").read_text())["data_hash"]
