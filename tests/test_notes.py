"""notes extract on the fixture vault: every vault feature, broken files, symlink loops, determinism, the guard."""

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.test_generate import scripted  # noqa: F401  (the scripted teacher server fixture)

from qmd_unsloth.notes import SHAPES, read_vault
from tests.conftest import REPO, run_module

FIXTURE = REPO / "tests" / "fixtures" / "vault"
NOTES = {"Broken/bad front matter.md", "Daily/2024-03-05.md", "People/Maria Silva.md", "Projects/Project Alpha.md",
         "Recipes/Sourdough.txt", "Tech/Postgres migration.md", "Shared/Team handbook.md"}
SECRETS = ("zebrafishcodeword", "kangaroocodeword", "obsidiansecret", "trashsecret", "caf")


def make_vault(tmp_path: Path) -> Path:
    """A copy of the fixture vault plus what git cannot hold: a symlink loop and a second link to a note."""
    vault = tmp_path / "vault"
    shutil.copytree(FIXTURE, vault)
    os.symlink("..", vault / "Projects" / "loop")  # Projects/loop -> the vault root: a cycle
    os.symlink(vault / "Tech", vault / "People" / "tech-again")  # the same folder through a second path
    outside = tmp_path / "shared-notes"  # a folder outside the vault, linked in, that links to itself
    outside.mkdir()
    (outside / "Team handbook.md").write_text("# Team handbook\n\nOn-call rotation and the incident checklist.\n")
    os.symlink(outside, outside / "self")
    os.symlink(outside, vault / "Shared")
    return vault


@pytest.fixture
def vault(tmp_path):
    return make_vault(tmp_path)


def test_reader_parses_every_vault_feature_and_skips_what_is_not_a_note(vault, capsys):
    notes = {n.path: n for n in read_vault(vault)}
    err = capsys.readouterr().err
    assert set(notes) == NOTES  # no .obsidian/, .trash/, png, binary, non-UTF-8 file, nothing twice through links
    assert f"warning: {vault / 'Broken' / 'latin1.md'}: not UTF-8 (byte 0xe9 at offset 3); skipped" in err
    assert f"{vault / 'Broken' / 'nul bytes.md'}: binary file" in err
    assert f"{vault / 'Broken' / 'bad front matter.md'}: front matter is not valid YAML" in err
    assert f"{vault / 'Shared' / 'self'}: folder already read through another path (symlink loop?)" in err
    alpha = notes["Projects/Project Alpha.md"]
    assert alpha.title == "Project Alpha kickoff" and alpha.aliases == ["Alpha launch", "PA kickoff"]
    assert alpha.tags == ["project/alpha", "meeting", "decision"]  # front matter, then inline; nested kept whole
    assert alpha.links == ["Maria Silva", "People/Tomas Berg", "Postgres"]
    assert alpha.embeds == ["attachments/alpha-diagram.png"]
    assert [s.heading for s in alpha.sections] == [None, "Project Alpha kickoff", "Decisions", "Budget"]
    assert "zebrafishcodeword" in alpha.text and "zebrafishcodeword" not in alpha.prose  # code: searchable, not mined
    assert "title: Project Alpha kickoff" not in alpha.text  # front matter removed from the document
    assert "Kickoff with Maria and" in alpha.prose  # [[target|alias]] reads as its alias
    pg = notes["Tech/Postgres migration.md"]
    assert "kangaroocodeword" in pg.text and "kangaroocodeword" not in pg.prose  # indented code block
    assert pg.tags == ["tech/database", "project/alpha"]
    maria = notes["People/Maria Silva.md"]
    assert maria.aliases == ["Maria"] and maria.tags == ["person", "people/finance"]
    assert str(notes["Daily/2024-03-05.md"].date) == "2024-03-05"
    assert "irrigation" in notes["Broken/bad front matter.md"].text


def extract(vault, out, *extra):
    return run_module("qmd_unsloth.notes", "extract", "--vault", str(vault), "--out", str(out), *extra)


def test_extract_covers_the_shapes_people_type(vault, tmp_path):
    out = tmp_path / "cands.jsonl"
    r = extract(vault, out, "--per-note", "12")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "latin1.md: not UTF-8" in r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(set(row) == {"query", "source", "shape"} for row in rows)  # no output without --expand-with
    assert {row["source"]["path"] for row in rows} == NOTES
    assert {row["shape"] for row in rows} == set(SHAPES)
    by = {(row["shape"], row["query"]): row["source"] for row in rows}
    assert by[("title", "project alpha kickoff")] == {"path": "Projects/Project Alpha.md", "heading": None}
    assert by[("alias", "alpha launch")]["path"] == "Projects/Project Alpha.md"
    assert by[("question", "what did we decide about project alpha kickoff")]["heading"] == "Decisions"
    assert by[("heading", "project alpha kickoff budget")]["heading"] == "Budget"  # a generic heading gets the topic
    assert by[("date", "march 5 2024")]["path"] == "Daily/2024-03-05.md"
    assert any(s == "tag" and q.startswith("tech database") for s, q in by)  # nested tag tech/database
    assert any(s == "entity" and q.startswith("tomas berg") for s, q in by)  # a wikilink target by its name
    misspelled = [q for s, q in by if s == "misspelled"]
    assert "prjoect alpha kickoff" in misspelled or any(q != t for q in misspelled for t in ["project alpha kickoff"])
    text = out.read_text().lower()
    assert not any(s in text for s in SECRETS)  # code blocks, .obsidian, .trash, non-UTF-8 never mined
    assert max(sum(r["source"]["path"] == p for r in rows) for p in NOTES) <= 12
    # deterministic: the same vault and seed give the same bytes; --per-note caps each note
    again = tmp_path / "again.jsonl"
    assert extract(vault, again, "--per-note", "12").returncode == 0 and again.read_bytes() == out.read_bytes()
    capped = tmp_path / "capped.jsonl"
    assert extract(vault, capped, "--per-note", "2").returncode == 0
    counts = [json.loads(x)["source"]["path"] for x in capped.read_text().splitlines()]
    assert all(counts.count(p) <= 2 for p in NOTES)


def test_teacher_endpoint_must_be_local_unless_allowed(vault, tmp_path):
    out = tmp_path / "c.jsonl"
    r = extract(vault, out, "--mode", "teacher", "--teacher-url", "https://api.example.com/v1")
    assert r.returncode == 1 and not out.exists()
    assert r.stderr.strip().splitlines()[-1] == (
        "error: --teacher-url https://api.example.com/v1: api.example.com is not this machine and notes are private; "
        "use a local endpoint or pass --allow-remote to send note text there")
    # a loopback URL passes the guard; with nothing listening it is a one-line connection error, no traceback
    r = extract(vault, out, "--mode", "teacher", "--teacher-url", "http://127.0.0.1:9/v1")
    assert r.returncode == 1 and "Traceback" not in r.stderr and "connection failed" in r.stderr
    r = extract(vault, out, "--expand-with", "missing.gguf")
    assert r.returncode == 1 and "error: --expand-with missing.gguf: GGUF file not found" in r.stderr
    r = extract(tmp_path / "nowhere", out)
    assert r.returncode == 1 and "vault folder not found" in r.stderr


def test_the_current_model_writes_expansions(vault, tmp_path, tiny_gguf):
    out = tmp_path / "c.jsonl"
    r = extract(vault, out, "--per-note", "1", "--expand-with", str(tiny_gguf), "--max-new-tokens", "40")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(NOTES)
    expanded = [row for row in rows if "output" in row]
    assert expanded  # QMD's grammar: whatever the random tiny model writes comes out as prefixed lines
    assert all(k in ("lex", "vec", "hyde") and t.strip() for row in expanded for k, t in row["output"])


def test_a_teacher_endpoint_writes_the_expansions(vault, tmp_path, scripted):
    """Teacher expansions through qmd_unsloth.teacher, against the scripted local server of the generate tests (a
    stand-in for a real teacher model, which cannot run here)."""
    from tests.test_generate import Script

    url = scripted(Script(plan={}))
    out = tmp_path / "c.jsonl"
    r = extract(vault, out, "--per-note", "1", "--expand-with", "teacher", "--teacher-url", url,
                "--teacher-model", "scripted")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and all(r.get("output") for r in rows)
    from qmd_unsloth.reward import score_expansion

    q = rows[0]["query"]
    assert score_expansion(q, "\n".join(f"{k}: {t}" for k, t in rows[0]["output"])).hard_failure is None
