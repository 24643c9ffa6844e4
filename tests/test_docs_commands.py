"""Every command README.md and docs/*.md show works as written (issue 23).

What counts as a command: each line of a fenced ``bash``/``sh`` block (a trailing backslash joins the next line),
each ``$ `` line of a ``console`` block, and inline code outside blocks that starts like a command (``python -m
qmd_unsloth``, ``bash scripts/``, ...; a synopsis with ``<...>`` or ``...`` placeholders is skipped).  Other fenced
blocks (``text``, ``yaml``, ``json``, ...) are output or examples and must not hold commands.  Every command is CHECKED: ``python -m qmd_unsloth.X`` must exist and its
``--help`` (and its subcommand's, for a subcommand used) must list every flag used; ``python scripts|benchmarks/F.py``
must exist and, when given flags, list them in its ``--help``; ``bash scripts/F.sh`` must exist and handle its flags;
``pip install -e '.[a,b]'`` must name extras of pyproject.toml; a repository path a command names (``configs/...``,
``data/...``, ``tests/fixtures/...``, ...) must exist; optional-argument brackets (``[--flag X]``) are refused, since
such a line cannot be run as written.  A block preceded by the line ``<!-- test: run -->`` is also RUN, its lines in order,
in a fresh temporary folder that links the repository's data/, configs/, tests/, scripts/ and benchmarks/ (so what it writes
under runs/ stays there), with the package on PYTHONPATH and the Hugging Face hub offline.  Relative links between the
pages must point at files (and headings) that exist.  See docs/README.md.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RUN_MARK = "<!-- test: run -->"
SHELL_LANGS = {"bash", "sh", "shell"}
CONSOLE_LANGS = {"console"}
LINKED_INTO_RUN_DIR = ("data", "configs", "tests", "scripts", "benchmarks")
REPO_PATH_PREFIXES = ("configs/", "data/", "tests/fixtures/", "scripts/", "benchmarks/", "notebooks/", "docs/")
OPERATORS = {"&&", "||", "|", ";", "&"}
REDIRECT = re.compile(r"[<>]+&?")  # > FILE, >> FILE, < FILE, >& FILE (shlex splits 2>&1 into 2, >&, 1)
FLAG = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@dataclass
class Command:
    page: Path
    line: int  # 1-based line of the page where the command starts
    text: str
    run: bool
    block: int = 0  # 1-based line of the page where its fenced block starts

    def where(self) -> str:
        return f"{rel(self.page)}:{self.line}"


def rel(page: Path) -> str:
    return str(page.relative_to(REPO)) if page.is_relative_to(REPO) else page.name


# ------------------------------------------------------------------------------------------------ reading the pages
def fenced_blocks(text: str):
    """(language, first line number, lines, marked to run) of every fenced block."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)(```+|~~~+)\s*([\w+-]*)", lines[i])
        if not m:
            i += 1
            continue
        fence, lang = m.group(2), m.group(3).lower()
        prev = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        body, start = [], i + 2
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        yield lang, start, body, prev == RUN_MARK
        i += 1


def joined(body: list[str], start: int):
    """(line number, logical line) with backslash continuations joined."""
    out, buf, first = [], "", None
    for n, line in enumerate(body, start):
        if first is None:
            first = n
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        out.append((first, buf + line))
        buf, first = "", None
    if buf:
        out.append((first, buf))
    return out


INLINE = re.compile(r"`((?:python -m qmd_unsloth|python scripts/|python benchmarks/|bash scripts/|pip install )[^`]*)`")


def inline_commands(page: Path) -> list[Command]:
    """Commands in inline code outside fenced blocks (`python -m qmd_unsloth.x --flag`): checked, never run."""
    out, in_fence = [], False
    for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        if re.match(r"^\s*(```|~~~)", line):
            in_fence = not in_fence
            continue
        if not in_fence:  # a synopsis with placeholders (<stage>, ...) is not a command
            out += [Command(page, n, m.group(1).strip(), False) for m in INLINE.finditer(line)
                    if "<" not in m.group(1) and "..." not in m.group(1)]
    return out


def page_commands(page: Path) -> tuple[list[Command], list[str]]:
    """The commands of a page, and problems found while reading it (commands hidden in other blocks)."""
    commands, problems = inline_commands(page), []
    for lang, start, body, run in fenced_blocks(page.read_text(encoding="utf-8")):
        if lang in SHELL_LANGS:
            for n, line in joined(body, start):
                if line.strip() and not line.strip().startswith("#"):
                    commands.append(Command(page, n, line.strip(), run, start - 1))
        elif lang in CONSOLE_LANGS:
            for n, line in joined(body, start):
                if line.startswith("$ "):
                    commands.append(Command(page, n, line[2:].strip(), run, start - 1))
        else:
            for n, line in enumerate(body, start):
                s = line.strip()
                if s.startswith(("$ ", "python -m qmd_unsloth", "bash scripts/", "python scripts/", "python benchmarks/")):
                    problems.append(f"{rel(page)}:{n}: a command in a ```{lang or '(no language)'} block; "
                                    "put commands in ```bash (or $ lines in ```console) so they are checked")
    return commands, problems


# --------------------------------------------------------------------------------------------- checking a command
def tokens(line: str) -> list[str]:
    lex = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
    lex.whitespace_split = True
    lex.commenters = "#"
    return list(lex)


def simple_commands(line: str) -> list[list[str]]:
    """The simple commands of a shell line: split at operators, without redirections and leading VAR=value."""
    out, cur, skip_next = [], [], False
    for tok in tokens(line):
        if skip_next:
            skip_next = False
            continue
        if tok in OPERATORS:
            out.append(cur)
            cur = []
        elif REDIRECT.fullmatch(tok):
            skip_next = True
        else:
            cur.append(tok)
    out.append(cur)
    cleaned = []
    for argv in out:
        while argv and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", argv[0]):
            argv = argv[1:]
        if argv:
            cleaned.append(argv)
    return cleaned


def is_flag(tok: str) -> bool:
    return tok.startswith("-") and tok != "-" and not re.match(r"^-\d", tok)


def flag_name(tok: str) -> str:
    return tok.split("=", 1)[0]


def run_env(extra: dict | None = None) -> dict:
    # `python` in a documented command is the interpreter running the tests (its venv's bin first, as when activated)
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(extra or {})}


@lru_cache(maxsize=None)
def help_text(*argv: str) -> tuple[int, str]:
    r = subprocess.run([sys.executable, *argv, "--help"], capture_output=True, text=True, cwd=REPO, env=run_env(),
                       timeout=300)
    return r.returncode, r.stdout + r.stderr


def subcommands(help_out: str) -> set[str]:
    m = re.search(r"\{([\w,-]+)\}", help_out)
    return set(m.group(1).split(",")) if m else set()


def check_flags(what: str, used: list[str], helps: list[str]) -> list[str]:
    known = {"-h", "--help"}
    for h in helps:
        known |= set(FLAG.findall(h))
    return [f"{what}: {f} is not in its --help" for f in dict.fromkeys(used) if f not in known]


def check_module(module: str, args: list[str]) -> list[str]:
    if find_spec(module) is None:
        return [f"no module {module}"]
    if module == "qmd_unsloth":
        return []
    flags = [flag_name(a) for a in args if is_flag(a)]
    rc, main_help = help_text("-m", module)
    if rc != 0:
        return [f"python -m {module} --help exited {rc}: {main_help.strip().splitlines()[-1:]}"]
    helps, problems = [main_help], []
    subs = subcommands(main_help)
    if subs:
        sub = next((a for a in args if a in subs), None)
        if sub is None:
            return [f"python -m {module}: no subcommand among {{{','.join(sorted(subs))}}} in {args}"]
        rc, sub_help = help_text("-m", module, sub)
        if rc != 0:
            return [f"python -m {module} {sub} --help exited {rc}"]
        helps.append(sub_help)
    elif args and re.fullmatch(r"[a-z_]+", args[0]):  # a subcommand the main --help does not list (serve reload)
        rc, sub_help = help_text("-m", module, args[0])
        if rc == 0 and sub_help != main_help:
            helps.append(sub_help)
    return problems + check_flags(f"python -m {module}", flags, helps)


def check_script(path: str, args: list[str]) -> list[str]:
    if not (REPO / path).is_file():
        return [f"no file {path}"]
    flags = [flag_name(a) for a in args if is_flag(a)]
    if not flags:
        return []
    rc, out = help_text(path)
    if rc != 0:
        return [f"python {path} --help exited {rc}"]
    return check_flags(f"python {path}", flags, [out])


def check_shell_script(path: str, args: list[str]) -> list[str]:
    if not (REPO / path).is_file():
        return [f"no file {path}"]
    text = (REPO / path).read_text()
    return [f"bash {path}: {f} is not handled by the script" for f in dict.fromkeys(flag_name(a) for a in args if is_flag(a))
            if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", text)]


@lru_cache(maxsize=1)
def extras() -> set[str]:
    text = (REPO / "pyproject.toml").read_text()
    try:
        import tomllib  # Python 3.11+
    except ImportError:  # 3.10: the names of the [project.optional-dependencies] table
        table = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
        return set(re.findall(r"^([A-Za-z][\w-]*)\s*=", table, re.M))
    return set(tomllib.loads(text)["project"]["optional-dependencies"])


def check_pip(args: list[str]) -> list[str]:
    problems = []
    for a in args:
        m = re.match(r"^\.\[([\w,-]+)\]$", a)
        if m:
            problems += [f"pip install: no extra {e!r} in pyproject.toml" for e in m.group(1).split(",")
                         if e not in extras()]
    return problems


def check_paths(argv: list[str]) -> list[str]:
    problems = []
    for tok in argv:
        value = tok.split("=", 1)[1] if is_flag(tok) and "=" in tok else tok
        if value.startswith(REPO_PATH_PREFIXES):
            pattern = value.rstrip("/")
            if "*" in pattern:
                if not list(REPO.glob(pattern)):
                    problems.append(f"no file matches {value}")
            elif not (REPO / pattern).exists():
                problems.append(f"no file or folder {value}")
    return problems


def check_command(line: str) -> list[str]:
    try:
        parts = simple_commands(line)
    except ValueError as e:  # unbalanced quotes
        return [f"cannot parse as a shell line ({e})"]
    problems = []
    for argv in parts:
        if any(t.startswith("[-") for t in argv):
            problems.append("optional-argument brackets ([--flag ...]): write the command out, options in prose")
        problems += check_paths(argv)
        prog, args = argv[0], argv[1:]
        if prog in ("python", "python3"):
            if args[:1] == ["-m"] and len(args) > 1:
                module = args[1]
                if module.split(".")[0] == "qmd_unsloth":
                    problems += check_module(module, args[2:])
                elif module == "pytest" and find_spec("pytest") is None:
                    problems.append("no module pytest")
            elif args and args[0].endswith(".py"):
                problems += check_script(args[0], args[1:])
        elif prog == "bash" and args and args[0].endswith(".sh"):
            problems += check_shell_script(args[0], args[1:])
        elif prog == "pip" and args[:1] == ["install"]:
            problems += check_pip(args[1:])
        elif prog in ("torchrun", "accelerate"):
            if prog == "accelerate" and args[:1] != ["launch"]:
                continue
            if "-m" in args:
                i = args.index("-m")
                problems += check_module(args[i + 1], args[i + 2:])
    return problems


def all_commands() -> tuple[list[Command], list[str]]:
    commands, problems = [], []
    for page in PAGES:
        c, p = page_commands(page)
        commands += c
        problems += p
    return commands, problems


# ------------------------------------------------------------------------------------------------------- links
def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    in_fence = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        m = re.match(r"^#{1,6}\s+(.*)$", line)
        if m and not in_fence:
            s = slug(m.group(1))
            n = seen.get(s, 0)
            out.add(s if n == 0 else f"{s}-{n}")
            seen[s] = n + 1
    return out


def check_links(page: Path, root: Path = REPO) -> list[str]:
    problems = []
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = page if not path else (page.parent / path).resolve()
        if not dest.exists():
            problems.append(f"{page.relative_to(root)}: link to {target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{page.relative_to(root)}: link to {target}: no such heading in {dest.name}")
    return problems


# --------------------------------------------------------------------------------------------------------- tests
def test_the_readme_is_a_front_door():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.encode()) < 10_000, "README.md should stay under ~10 KB: move detail into docs/"
    assert "python -m pytest" in readme and "python -m pytest" in (REPO / ".ci" / "run").read_text()
    for page in ("docs/README.md", "docs/quickstart.md", "docs/training.md", "docs/data.md", "docs/export.md"):
        assert page in readme or page.removeprefix("docs/") in readme, page


def test_every_documented_command_is_checked_and_valid():
    commands, problems = all_commands()
    assert len(commands) > 50 and {c.page.name for c in commands} >= {"README.md", "training.md", "data.md"}
    for c in commands:
        problems += [f"{c.where()}: {c.text[:90]}: {p}" for p in check_command(c.text)]
    assert not problems, "\n".join(problems)


def test_links_between_the_pages_resolve():
    problems = [p for page in PAGES for p in check_links(page)]
    assert not problems, "\n".join(problems)


RUN_BLOCKS: dict[str, list[Command]] = {}
for _c in all_commands()[0]:
    if _c.run:
        RUN_BLOCKS.setdefault(f"{_c.page.name}:{_c.block}", []).append(_c)


def test_some_blocks_are_marked_to_run():
    pages = {c.page.name for block in RUN_BLOCKS.values() for c in block}
    assert sum(map(len, RUN_BLOCKS.values())) >= 8 and len(pages) >= 3


@pytest.mark.parametrize("block", list(RUN_BLOCKS), ids=list(RUN_BLOCKS))
def test_marked_blocks_run_as_written(block, tmp_path):
    """A marked block runs line by line, in order, in a fresh folder that links the repository's inputs."""
    for name in LINKED_INTO_RUN_DIR:
        (tmp_path / name).symlink_to(REPO / name)
    home = tmp_path / ".home"
    env = run_env({"XDG_CONFIG_HOME": str(home / "config"), "XDG_DATA_HOME": str(home / "data"),
                   "XDG_CACHE_HOME": os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))})
    for command in RUN_BLOCKS[block]:
        r = subprocess.run(["bash", "-c", f"set -o pipefail; {command.text}"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0 and "Traceback" not in r.stderr, \
            f"{command.where()}: {command.text}\n{r.stdout[-1500:]}\n{r.stderr[-3000:]}"


# ------------------------------------------------------------------------------------------- the checker itself
def test_the_checker_catches_renamed_flags_modules_subcommands_and_paths(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("\n".join([
        "```bash",
        "python -m qmd_unsloth.sft --config configs/sft.yaml --lora-rank 8",
        "python -m qmd_unsloth.no_such_stage --out x",
        "python -m qmd_unsloth.data validata data/*.jsonl",
        "python -m qmd_unsloth.curate --db x.db import --approved f.jsonl",
        "python -m qmd_unsloth.grpo --config configs/no-such.yaml",
        "bash scripts/train.sh --smok",
        "pip install -e '.[gpu,gpux]'",
        "python scripts/no_such.py",
        "python benchmarks/reward_speed.py --rows 5",
        "python -m qmd_unsloth.export --model m --out o [--quant q8_0]",
        "torchrun --nproc_per_node 2 -m qmd_unsloth.sft --lora-rank 4",
        "```",
        "```text",
        "$ python -m qmd_unsloth.sft",
        "```",
    ]) + "\n")
    commands, problems = page_commands(page)
    found = {c.text: check_command(c.text) for c in commands}
    texts = [c.text for c in commands]
    assert any("--lora-rank is not in its --help" in p for p in found[texts[0]])
    assert found[texts[1]] == ["no module qmd_unsloth.no_such_stage"]
    assert "no subcommand among" in found[texts[2]][0]
    assert found[texts[3]] == ["python -m qmd_unsloth.curate: --approved is not in its --help"]
    assert found[texts[4]] == ["no file or folder configs/no-such.yaml"]
    assert found[texts[5]] == ["bash scripts/train.sh: --smok is not handled by the script"]
    assert found[texts[6]] == ["pip install: no extra 'gpux' in pyproject.toml"]
    assert "no file scripts/no_such.py" in found[texts[7]]
    assert found[texts[8]] == ["python benchmarks/reward_speed.py: --rows is not in its --help"]
    assert any("optional-argument brackets" in p for p in found[texts[9]])
    assert any("--lora-rank is not in its --help" in p for p in found[texts[10]])
    assert len(problems) == 1 and "a command in a ```text block" in problems[0]
    # and a correct page has nothing to say
    ok = tmp_path / "ok.md"
    ok.write_text("<!-- test: run -->\n```bash\nQMD_UNSLOTH_GRPO_LEARNING_RATE=1e-5 python -m qmd_unsloth.grpo \\\n"
                  "    --config configs/grpo.yaml --dry-run   # a comment\n```\n")
    (cmd,), problems = page_commands(ok)
    assert cmd.run and cmd.line == 3 and not problems and check_command(cmd.text) == []


def test_the_link_checker_finds_missing_files_and_headings(tmp_path):
    (tmp_path / "a.md").write_text("# Title\n\n## What `checked` means\n\n[b](b.md) [self](#what-checked-means) "
                                   "[gone](#gone) [c](c.md#x)\n")
    (tmp_path / "b.md").write_text("# B\n")
    problems = check_links(tmp_path / "a.md", root=tmp_path)
    assert problems == ["a.md: link to #gone: no such heading in a.md", "a.md: link to c.md#x: no such file"]
