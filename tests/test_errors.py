"""Every command, run as a user runs it, on bad inputs: exit status 1 or 2, a short stderr ending in one `error:` line
that says what is wrong, no traceback, and nothing half-written under a final name.

Each row of CASES is one `python -m qmd_unsloth.<command> ...` in a subprocess; the rows run side by side, as many as
there are CPUs.  Most fail before torch is imported (a second or two each); rows that must load transformers or wait
on the hub's retries are marked slow (`pytest -m slow tests/test_errors.py`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import struct
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import REPO, run_module


@dataclass(frozen=True)
class Case:
    """One bad input.  ``args`` is split on spaces after filling the placeholders (see ``fill``)."""

    cmd: str  # the module under qmd_unsloth: python -m qmd_unsloth.<cmd>
    args: str
    code: int  # expected exit status (1: a fault, 2: a bad command line or config)
    says: str  # a fragment of the last stderr line (the `error:` line), after placeholders are filled
    env: dict = field(default_factory=dict)  # extra environment (placeholders filled too)
    absent: tuple = ()  # paths that must not exist afterwards (nothing half-written under a final name)
    needs: tuple = ()  # "ro", "full": a tmpfs mount; "tools": the llama.cpp tools folder; "llama_cpp"
    slow: bool = False  # loads transformers or waits on retries: run with `pytest -m slow`


# THE TABLE.  To cover a new command, add one line per bad input (and its name to STAGES in __main__.py), e.g.
#     Case("serve", "--model {fx}/junk.gguf --port {busy_port}", 1, "address already in use"),
#     Case("generate", "--base-url {dead_url}/v1 --model m --count 2 --out {tmp}/g.jsonl", 1, "cannot reach"),
# Fields: command, arguments, exit status, a fragment of the `error:` line; optional env, absent (paths that must not
# exist afterwards), needs ("ro", "full", "tools", "llama_cpp": skipped with the reason when missing), slow=True.
# Placeholders: {tmp} an empty folder of the row; {ro} a read-only tmpfs; {full} a 1 MiB tmpfs filled up before the
# row; {tiny} the tiny model; {busy_port} a port this test holds open; {dead_url} an http URL nobody listens on;
# {blocker} a PYTHONPATH folder that hides the packages named in QMD_TEST_BLOCK (see BLOCKER); {fx} shared bad files
# made by `fixtures` below: afile, empty.jsonl, latin1.jsonl, badjson.jsonl, bad.yaml, list.yaml, trl.yaml (a bad TRL
# passthrough value), trl5.yaml (a passthrough that is not a mapping), hfrows.jsonl (a dataset file with
# columns q and output), junk.gguf (not a
# GGUF), trunc.gguf (a GGUF cut short), noconfig/ (no config.json), badconfig/ (config.json not JSON), badadapter/
# (adapter_config.json not JSON), beir/ and badbeir/ (collections), badexp.jsonl, hubrun/ (a run folder with a .gguf),
# q.txt, noq.txt, q_latin1.txt.
CASES = [
    # data
    Case("data", "validate {fx}/nope.jsonl", 1, "0 good rows, 1 problem(s)"),
    Case("data", "validate {fx}/noconfig", 1, "noconfig: no *.jsonl files in this folder"),
    Case("data", "prepare {fx}/latin1.jsonl --out {tmp}/o", 1, "latin1.jsonl:1: not UTF-8 (byte 0xe9 at column 15)",
         absent=("{tmp}/o/train.jsonl",)),
    Case("data", "prepare {fx}/empty.jsonl --out {tmp}/o", 1, "empty.jsonl: no training rows",
         absent=("{tmp}/o/train.jsonl",)),
    Case("data", "prepare {fx}/badjson.jsonl {fx}/latin1.jsonl --out {tmp}/o", 1, "error: 3 problems in the data"),
    Case("data", "prepare --out {fx}/afile/sub", 1, "afile/sub: a part of the path is a file, not a folder"),
    Case("data", "prepare --out {ro}/o", 1, "{ro}/o: read-only file system", needs=("ro",)),
    Case("data", "prepare --out {full}/o", 1, "{full}/o/train.jsonl: no space left on device", needs=("full",),
         absent=("{full}/o/train.jsonl",)),
    Case("data", "stats {fx}/badjson.jsonl", 1, "error: 2 problems in the data"),
    Case("data", "stats --json {ro}/s.json", 1, "{ro}/s.json: read-only file system", needs=("ro",)),
    Case("data", "prepare --val-fraction 2", 2, "--val-fraction must be in [0, 1)"),
    # data from Hugging Face datasets (hub id, save_to_disk folder, parquet/JSONL files)
    Case("data", "validate --dataset {fx}/nope.parquet", 1, "nope.parquet: no such file or folder"),
    Case("data", "validate --dataset nobody/no-such-rows", 1,
         "nobody/no-such-rows: dataset not in the local Hugging Face cache and HF_HUB_OFFLINE=1 is set",
         env={"HF_HOME": "{tmp}/hf"}),
    Case("data", "stats --dataset {fx}/hfrows.jsonl --column query=question", 1,
         "hfrows.jsonl[train]: no column 'question' for query (columns: q, output)"),
    Case("data", "prepare --dataset {fx}/hfrows.jsonl --column query=q --column lex=output --out {tmp}/o", 1,
         "hfrows.jsonl[train]:1: lex: must be a string or a list of strings (column 'output')",
         absent=("{tmp}/o/train.jsonl",)),
    Case("data", "validate --dataset {fx}/hfrows.jsonl --column querry=q", 2, "--column: columns: unknown field"),
    Case("sft", "--base-model {tiny} --output-dir {tmp} --data [] --hf-datasets "
         '[{{"source":"{fx}/hfrows.jsonl","columns":{{"query":"q","lex":"output"}}}}]', 1,
         "hfrows.jsonl[train]:1: lex: must be a string or a list of strings (column 'output')", absent=("{tmp}/sft",)),
    # reward
    Case("reward", "{fx}/nope.jsonl", 1, "nope.jsonl: cannot read: No such file or directory"),
    Case("reward", "{fx}/latin1.jsonl", 1, "latin1.jsonl: not UTF-8"),
    Case("reward", "{fx}/badjson.jsonl", 1, "2 bad row(s) skipped"),
    Case("reward", "", 2, "give a JSONL file or --selftest"),
    # sft (the fault is found before the model loads unless the id says so)
    Case("sft", "--config {fx}/bad.yaml", 2, "bad.yaml: not valid YAML"),
    Case("sft", "--config {fx}/list.yaml", 2, "list.yaml: must hold a mapping"),
    Case("sft", "--config {fx}/nope.yaml", 2, "nope.yaml: config file not found"),
    Case("sft", "--lora-r x", 2, "lora_r: Input should be a valid integer"),
    Case("sft", "--base-model {tiny} --data {fx}/latin1.jsonl --output-dir {tmp}", 1,
         "latin1.jsonl:1: not UTF-8 (byte 0xe9 at column 15)", absent=("{tmp}/sft",)),
    Case("sft", "--base-model {tiny} --data {fx}/empty.jsonl --output-dir {tmp}", 1, "no training rows"),
    Case("sft", "--base-model {tiny} --data {fx}/nope.jsonl --output-dir {tmp}", 1, "nope.jsonl: file not found"),
    Case("sft", "--base-model {fx}/noconfig --output-dir {tmp}", 1, "noconfig: no config.json in this folder"),
    Case("sft", "--base-model {fx}/junk.gguf --output-dir {tmp}", 1, "junk.gguf: not a GGUF file"),
    Case("sft", "--base-model {tiny} --output-dir {ro}", 1, "read-only file system", needs=("ro",)),
    Case("sft", "--base-model {tiny} --output-dir {fx}/afile", 1, "a part of the path is a file"),
    Case("sft", "--base-model {fx}/trunc.gguf --output-dir {tmp} --use-cpu", 1,
         "trunc.gguf: cannot read this GGUF file (truncated or corrupt", slow=True),
    Case("sft", "--base-model {fx}/badconfig --output-dir {tmp} --use-cpu", 1, "badconfig: cannot load this model",
         slow=True),
    Case("sft", "--base-model nobody/no-such-model --output-dir {tmp} --use-cpu", 1,
         "weights are not in the local Hugging Face cache and HF_HUB_OFFLINE=1 is set", slow=True),
    # the TRL passthrough (trl:): a bad name or value names the key and its source, before any run folder is made
    Case("sft", "--base-model {tiny} --output-dir {tmp} --use-cpu --trl max_grad_nrm=1", 2,
         "command line: trl.max_grad_nrm: not a field of TRL", absent=("{tmp}/sft",)),
    Case("sft", "--base-model {tiny} --output-dir {tmp} --use-cpu", 2,
         "environment QMD_UNSLOTH_SFT_TRL: trl.max_grad_norm: Input should be a valid number",
         env={"QMD_UNSLOTH_SFT_TRL": '{{"max_grad_norm": "abc"}}'}, absent=("{tmp}/sft",)),
    Case("sft", "--base-model {tiny} --output-dir {tmp}", 2, "environment QMD_UNSLOTH_SFT_TRL: not valid JSON",
         env={"QMD_UNSLOTH_SFT_TRL": "optim=adafactor"}),
    Case("sft", "--config {fx}/trl5.yaml", 2, "trl5.yaml: trl: Input should be a valid dictionary"),
    Case("grpo", "--config {fx}/trl.yaml --sft-model {tiny} --output-dir {tmp} --use-cpu", 2,
         "trl.yaml: trl.optim: nope is not a valid OptimizerNames", absent=("{tmp}/grpo",)),
    # grpo
    Case("grpo", "--sft-model {tmp}/nope --output-dir {tmp}", 1, "nope: no such local model folder"),
    Case("grpo", "--num-generations 3", 2, "must be divisible by num_generations (3)"),
    # export
    Case("export", "--model {fx}/noconfig --out {tmp}/g", 1, "not a run folder, merged model or LoRA adapter"),
    Case("export", "--model {fx}/badconfig --out {tmp}/g --quant q9_z", 1, "quant: unknown type 'q9_z'"),
    Case("export", "--model {fx}/badconfig --out {tmp}/g --llama-cpp-dir {tmp}/none", 1,
         "none/convert_hf_to_gguf.py is missing; prepare them with"),
    Case("export", "--model {tiny} --out {ro}/g", 1, "{ro}/g: read-only file system", needs=("ro", "tools")),
    Case("export", "--model {fx}/badconfig --out {tmp}/g", 1, "badconfig: cannot load this model",
         needs=("tools",), slow=True),
    Case("export", "--model {fx}/badadapter --out {tmp}/g", 1, "badadapter: cannot load this LoRA adapter",
         needs=("tools",), slow=True),
    Case("export", "--model {tiny} --out {full}/g", 1, "{full}/g/qmd-query-expansion-f16.gguf: no space left on device",
         needs=("full", "tools"), absent=("{full}/g/qmd-query-expansion-q4_k_m.gguf",)),  # the converter runs
    # eval
    Case("eval", "--queries {fx}/q.txt", 1, "--model is required"),
    Case("eval", "--model {fx}/junk.gguf --queries {fx}/nope.txt --out {tmp}/e", 1, "nope.txt: queries file not found"),
    Case("eval", "--model {fx}/junk.gguf --queries {fx}/noq.txt --out {tmp}/e", 1, "noq.txt: no queries"),
    Case("eval", "--model {fx}/junk.gguf --queries {fx}/q_latin1.txt --out {tmp}/e", 1, "q_latin1.txt: not UTF-8"),
    Case("eval", "--model {fx}/noconfig --queries {fx}/q.txt --out {tmp}/e", 1, "not a .gguf file or a HF model"),
    Case("eval", "--model {fx}/junk.gguf --queries {fx}/q.txt --out {ro}/e", 1, "{ro}/e: read-only file system",
         needs=("ro",)),
    Case("eval", "--model {fx}/junk.gguf --queries {fx}/q.txt --out {tmp}/e", 1, "junk.gguf: not a GGUF file",
         needs=("llama_cpp",), absent=("{tmp}/e/report.json",)),
    Case("eval", "--model {fx}/trunc.gguf --queries {fx}/q.txt --out {tmp}/e", 1, "the file is truncated or corrupt",
         needs=("llama_cpp",)),
    Case("eval", "--model {fx}/junk.gguf --queries {fx}/q.txt --out {tmp}/e", 1,
         "the Python package 'llama_cpp' is not installed; install it with: pip install -e '.[export]'",
         env={"PYTHONPATH": "{blocker}:" + str(REPO), "QMD_TEST_BLOCK": "llama_cpp"}),
    Case("eval", "--model {fx}/badconfig --queries {fx}/q.txt --out {tmp}/e", 1,  # loads transformers
         "badconfig: cannot load this model"),  # loads transformers
    # bench
    Case("bench", "retrieval --collection {tmp}/nope", 1, "nope: collection folder not found"),
    Case("bench", "retrieval --collection {fx}", 1, "need *.all*.xml, *.qry*.xml and a *qrel* file"),
    Case("bench", "retrieval --collection {fx}/badbeir", 1, "badbeir: not a BEIR collection"),
    Case("bench", "retrieval --collection {fx}/beir --expansions {fx}/badexp.jsonl --out {tmp}/b", 1,
         "badexp.jsonl:1: need a JSON object with 'id' and 'completion'"),
    Case("bench", "retrieval --collection {fx}/beir --expansions {fx}/nope.jsonl", 1, "expansions file not found"),
    Case("bench", "retrieval --collection {fx}/beir --out {tmp}/b", 1,
         "the Python package 'sentence_transformers' is not installed; install it with: pip install -e '.[bench]'",
         env={"PYTHONPATH": "{blocker}:" + str(REPO), "QMD_TEST_BLOCK": "sentence_transformers"}),
    Case("bench", "retrieval --engine qmd --collection {fx}/beir --model {fx}/q.txt --out {tmp}/b", 1,
         "--engine qmd: --model must be a .gguf file"),
    Case("bench", "retrieval --engine qmd --collection {fx}/beir --out {tmp}/b", 1,
         "the real QMD 2.8.3 is not installed in {tmp}/nocache/qmd-2.8.3; install it",
         env={"QMD_UNSLOTH_CACHE": "{tmp}/nocache"}),
    # hub
    Case("hub", "card --run {tmp}/nope", 1, "nope: run folder not found"),
    Case("hub", "card --run {fx}/hubrun --eval {fx}/badjson.jsonl", 1, "badjson.jsonl: not an eval report.json"),
    Case("hub", "push --run {fx}/noconfig --repo me/x", 1, "noconfig: no .gguf file"),
    Case("hub", "push --run {fx}/hubrun --repo me/x", 1, "no Hugging Face token",
         env={"HF_TOKEN": "", "HF_HOME": "{tmp}/hf"}),
    Case("hub", "push --run {fx}/hubrun --repo me/x", 1, "me/x: cannot reach the hub",  # 5 retries: ~25 s
         env={"HF_TOKEN": "hf_not_a_real_token", "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "{dead_url}",
              "HF_HOME": "{tmp}/hf"}, slow=True),
    # llamacpp
    Case("llamacpp", "check --dir {tmp}/none", 1, "none/convert_hf_to_gguf.py is missing"),
    Case("llamacpp", "prepare --dir {tmp}/t --sdist {fx}/nope.tar.gz", 1, "nope.tar.gz: no such file or directory"),
    Case("llamacpp", "prepare --dir {tmp}/t --sdist {fx}/afile", 1, "afile: not a source archive",
         absent=("{tmp}/t",)),
    Case("llamacpp", "prepare --dir {ro}/t --sdist {fx}/afile", 1, "{ro}/t: read-only file system", needs=("ro",)),
    # tiny
    Case("tiny", "--out {full}/t", 1, "no space left on device", needs=("full",), absent=("{full}/t",)),
    # generate
    Case("generate", "--base-url {dead_url}/v1 --model m --count 2 --out {tmp}/g.jsonl", 1,
         "cannot reach the teacher", absent=("{tmp}/g.jsonl",)),
    Case("generate", "--base-url {dead_url}/v1 --model m --queries {fx}/q_latin1.txt --out {tmp}/g.jsonl", 1,
         "not UTF-8"),
    Case("generate", "--base-url {dead_url}/v1 --model m --queries {fx}/nope.txt --out {tmp}/g.jsonl", 1,
         "nope.txt: queries file not found"),
    # notes
    Case("notes", "extract --vault {tmp}/nope --out {tmp}/c.jsonl", 1, "nope: vault folder not found",
         absent=("{tmp}/c.jsonl",)),
    Case("notes", "extract --vault {tmp} --out {tmp}/c.jsonl --mode teacher --teacher-url https://example.com/v1", 1,
         "notes are private"),
    # curate
    Case("curate", "--db {tmp}/db.sqlite import {fx}/nope.jsonl", 1, "nope.jsonl: file not found"),
    Case("curate", "--db {fx}/latin1.jsonl stats", 1, "not a curate database"),
    # serve
    Case("serve", "--model {fx}/junk.gguf", 1, "junk.gguf: not a GGUF file"),
    Case("serve", "--model {fx}/junk.gguf --port {busy_port}", 1, "address already in use"),
    Case("serve", "reload --model {fx}/junk.gguf --url {dead_url}", 1, "cannot reach the server"),
    # qmd_install
    Case("qmd_install", "--model {fx}/junk.gguf --models-dir {tmp}/m --index {tmp}/none.yml", 1,
         "none.yml: no such file"),
    Case("qmd_install", "--rollback --models-dir {tmp}/m --index {tmp}/none.yml", 1, "no install to roll back"),
    Case("qmd_install", "--model {fx}/junk.gguf --models-dir {tmp}/m", 1, "junk.gguf: not a GGUF file",
         env={"QMD_CONFIG_DIR": "{tmp}/c"}, absent=("{tmp}/c/index.yml", "{tmp}/m")),
    Case("qmd_install", "--model {fx}/junk.gguf --models-dir {tmp}/m --project {tmp}", 1,
         "no .qmd/index.yaml or .qmd/index.yml here or above; create the project index first with: cd"),
    Case("qmd_install", "--model {fx}/junk.gguf --models-dir {tmp}/cache/qmd/models", 1,
         "inside QMD's model cache", env={"XDG_CACHE_HOME": "{tmp}/cache", "QMD_CONFIG_DIR": "{tmp}/c"}),
    Case("qmd_install", "--check --index {fx}/bad.yaml", 1, "bad.yaml: not valid YAML"),
    # smoke
    Case("smoke", "--workdir {fx}/afile/w", 1, "afile/w: a part of the path is a file"),
    Case("smoke", "--workdir {ro}/w", 1, "{ro}/w: read-only file system", needs=("ro",)),
]

# A stand-in for a machine without an optional package (we cannot uninstall packages from the shared test venv):
# a sitecustomize on PYTHONPATH that makes importing the packages named in QMD_TEST_BLOCK fail as a missing one does.
BLOCKER = '''import os, sys
BLOCKED = set(filter(None, os.environ.get("QMD_TEST_BLOCK", "").split(",")))
class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, _Blocker())
'''

TRACEBACK = "Traceback (most recent call last)"
PROGRESS = re.compile(r"\d+%\||it/s\]|s/it\]")  # tqdm bars that libraries print while loading


def _mount_tmpfs(where: Path, options: str) -> str | None:
    """Mounts a tmpfs; returns why not when this machine does not allow it."""
    where.mkdir(parents=True, exist_ok=True)
    if not shutil.which("mount"):
        return "no mount command"
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    return None if r.returncode == 0 else f"cannot mount a tmpfs here ({(r.stderr.strip() or 'not permitted')[:80]})"


def _fill(folder: Path) -> None:
    """Fills a small tmpfs: every write fails with ENOSPC, folders can still be made."""
    with open(folder / ".filler", "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError:
            pass


@pytest.fixture(scope="module")
def can_mount(tmp_path_factory):
    """None when this machine lets us mount a tmpfs (we run as root in CI), else why not."""
    probe = tmp_path_factory.mktemp("probe")
    why = _mount_tmpfs(probe, "size=64k")
    if why is None:
        subprocess.run(["umount", "-l", str(probe)], capture_output=True)
    return why


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    fx = tmp_path_factory.mktemp("fx")
    (fx / "afile").write_text("x\n")
    (fx / "empty.jsonl").write_bytes(b"")
    (fx / "latin1.jsonl").write_bytes('{"query": "caf\u00e9", "output": [["lex", "cafe"]]}\n'.encode("latin-1"))
    (fx / "badjson.jsonl").write_text('{"query": "x", "output": [["lex", "y"]]\n[1, 2]\n')
    (fx / "bad.yaml").write_text("lora_r: [1, 2\n")
    (fx / "list.yaml").write_text("- a\n- b\n")
    (fx / "trl.yaml").write_text("trl:\n  optim: nope\n")
    (fx / "hfrows.jsonl").write_text(json.dumps({"q": "docker volumes", "output": [["lex", "docker volume backup"],
                                                                                   ["vec", "how to back up volumes"]]})
                                     + "\n")
    (fx / "trl5.yaml").write_text("trl: 5\n")
    (fx / "junk.gguf").write_bytes(bytes(range(256)) * 8)
    # a GGUF cut short: the header says 1 tensor and 1 key, the key's name runs past the end of the file
    (fx / "trunc.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + struct.pack("<Q", 64) + b"general.")
    (fx / "noconfig").mkdir()
    (fx / "badconfig").mkdir()
    (fx / "badconfig" / "config.json").write_text("{not json")
    (fx / "badadapter").mkdir()
    (fx / "badadapter" / "adapter_config.json").write_text("{not json")
    (fx / "q.txt").write_text("# category: devops\ndocker volumes\n")
    (fx / "noq.txt").write_text("# category: devops\n# nothing else\n")
    (fx / "q_latin1.txt").write_bytes("caf\u00e9 menu\n".encode("latin-1"))
    (fx / "badexp.jsonl").write_text('{"id": "1", "completion"\n')
    beir = fx / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text(json.dumps({"_id": "d1", "title": "t", "text": "docker volumes"}) + "\n")
    (beir / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "docker volume"}) + "\n")
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    shutil.copytree(beir, fx / "badbeir")
    (fx / "badbeir" / "corpus.jsonl").write_text('{"_id": "d1", "text": \n')
    hubrun = fx / "hubrun"
    hubrun.mkdir()
    shutil.copy(fx / "junk.gguf", hubrun / "m.gguf")
    (fx / "blocker").mkdir()
    (fx / "blocker" / "sitecustomize.py").write_text(BLOCKER)
    return fx


@pytest.fixture(scope="module")
def ports():
    """A port held open by this test (for 'port in use' rows) and a URL nobody listens on."""
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()  # free again: connections to it are refused
    yield busy.getsockname()[1], f"http://127.0.0.1:{dead_port}"
    busy.close()


def _has_tools() -> bool:
    from importlib.util import find_spec

    from qmd_unsloth.llamacpp import DEFAULT_DIR, ToolsMissing, check

    try:
        check(DEFAULT_DIR)
    except ToolsMissing:
        return False
    return find_spec("llama_cpp") is not None


def _skip_reason(case: Case, can_mount: str | None) -> str | None:
    from importlib.util import find_spec

    for need in case.needs:
        if need in ("ro", "full") and can_mount:
            return f"{{{need}}}: {can_mount}"
        if need == "tools" and not _has_tools():
            return "llama.cpp tools folder missing: python -m qmd_unsloth.llamacpp prepare"
        if need == "llama_cpp" and find_spec("llama_cpp") is None:
            return "llama-cpp-python not installed"
    return None


@dataclass
class Outcome:
    code: int
    stderr: str
    says: str  # case.says with its placeholders filled
    written: list  # paths of ``absent`` that exist
    leftovers: list  # temporaries left in the row's folders


def _run_case(case: Case, root: Path, fx: Path, tiny: Path, ports) -> Outcome:
    """Runs one row in its own folders (its own tmpfs mounts), checks what it left on disk, unmounts."""
    tmp = root / "tmp"
    tmp.mkdir(parents=True)
    values = {"tmp": tmp, "fx": fx, "tiny": tiny, "blocker": fx / "blocker", "busy_port": ports[0],
              "dead_url": ports[1]}
    mounted = []
    try:
        for name, options in (("ro", "ro,size=64k"), ("full", "size=1m")):
            if name in case.needs:
                assert _mount_tmpfs(root / name, options) is None
                mounted.append(root / name)
                values[name] = root / name
        if "full" in values:
            _fill(values["full"])

        def fill(text: str) -> str:
            return text.format(**values)

        args = [fill(a) for a in case.args.split(" ") if a]
        env = {k: fill(v) for k, v in case.env.items()}
        try:
            r = run_module(f"qmd_unsloth.{case.cmd}", *args, env=env, timeout=600)
        except subprocess.TimeoutExpired as e:
            stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
            return Outcome(-1, f"{stderr}\n(timed out after 600 s)", fill(case.says), [], [])
        written = [fill(p) for p in case.absent if Path(fill(p)).exists()]
        leftovers = [str(p) for folder in [tmp, *mounted] for p in folder.rglob(".*.tmp*")]
        return Outcome(r.returncode, r.stderr, fill(case.says), written, leftovers)
    finally:
        for m in mounted:
            subprocess.run(["umount", "-l", str(m)], capture_output=True)


@pytest.fixture(scope="module")
def outcomes(request, fixtures, ports, tiny_model, can_mount, tmp_path_factory):
    """Runs every selected row up front, as many at a time as there are CPUs (interpreter start-up dominates)."""
    selected = [item.callspec.params["case"] for item in request.session.items
                if getattr(item, "callspec", None) and "case" in item.callspec.params
                and item.module is request.module]
    todo = [c for c in selected if _skip_reason(c, can_mount) is None]
    root = tmp_path_factory.mktemp("rows")
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        futures = {id(c): pool.submit(_run_case, c, root / str(i), fixtures, tiny_model, ports)
                   for i, c in enumerate(todo)}
        for f in futures.values():
            f.exception()  # wait for all; a row that failed to run fails alone, in its own test
    return futures


def _id(case: Case) -> str:
    return f"{case.cmd}-{case.args.split(' ')[0] if case.args else 'noargs'}-{case.says[:40]}"


@pytest.mark.parametrize("case", [pytest.param(c, id=_id(c), marks=[pytest.mark.slow] if c.slow else [])
                                  for c in CASES])
def test_bad_input_is_one_line_error(case, outcomes, can_mount):
    reason = _skip_reason(case, can_mount)
    if reason:
        pytest.skip(reason)
    out = outcomes[id(case)].result()
    shown = f"exit {out.code}\nstderr:\n{out.stderr[-3000:]}"
    assert TRACEBACK not in out.stderr, shown
    assert out.code == case.code, shown
    lines = [l for l in out.stderr.splitlines() if l.strip() and not PROGRESS.search(l)]
    assert lines, shown
    assert re.match(r"^(python -m qmd_unsloth\.\w+: )?error: ", lines[-1]), shown
    assert out.says in lines[-1], shown
    assert len(lines) <= 12 and len(lines[-1]) < 400, shown  # a short message (a bad-data listing is capped at 10)
    assert not out.written, f"{out.written} written\n{shown}"
    assert not out.leftovers, f"temporaries left behind: {out.leftovers}"


def test_every_command_has_rows():
    """New commands (python -m qmd_unsloth lists them) must get rows above."""
    from qmd_unsloth.__main__ import STAGES

    covered = {c.cmd for c in CASES}
    assert set(STAGES) - {"tiny", "llamacpp"} <= covered, sorted(set(STAGES) - covered)
