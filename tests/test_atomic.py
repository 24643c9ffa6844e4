"""qmd_unsloth.atomic: a killed or failing writer leaves the old output; leftovers of dead writers are cleaned, those
of live ones are not; and qmd_unsloth.cli.fault_message: which exceptions are one line and which stay bugs."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qmd_unsloth.atomic import atomic_folder, atomic_path, atomic_write_text, clean_stale, is_temporary
from qmd_unsloth.cli import UsageError, UserError, command, fault_message
from tests.conftest import REPO, as_in_a_terminal

WRITER = """
import os, sys, time
sys.path.insert(0, {repo!r})
from qmd_unsloth.atomic import atomic_path
with atomic_path({target!r}) as tmp:
    with open(tmp, "w") as fh:
        fh.write("half of the new")
        fh.flush()
        print(tmp, flush=True)
        time.sleep(60)
        fh.write(" content")
"""


def _writer(target: Path) -> tuple[subprocess.Popen, Path]:
    """A real process in the middle of an atomic write (its temporary is on disk, not yet renamed)."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER.format(repo=str(REPO), target=str(target))],
                            stdout=subprocess.PIPE, text=True)
    tmp = Path(proc.stdout.readline().strip())
    assert tmp.is_file() and tmp.parent == target.parent
    return proc, tmp


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_killed_writer_leaves_the_old_file_and_its_temporary_is_cleaned_next_time(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    proc, tmp = _writer(target)
    assert is_temporary(tmp) and tmp.name.startswith(".report.json.")
    proc.kill()
    proc.wait()
    assert target.read_text() == "old"  # never the half-written new content under the final name
    atomic_write_text(target, "new")  # the next run cleans up what the killed one left
    assert target.read_text() == "new" and not tmp.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_clean_stale_keeps_a_live_writers_temporary_and_other_files(tmp_path):
    target = tmp_path / "train.jsonl"
    proc, live = _writer(target)
    try:
        dead = tmp_path / f".val.jsonl.{_dead_pid()}.abc123.tmp"
        dead.write_text("x")
        dead_dir = tmp_path / f".merged.{_dead_pid()}.k2j_x9.tmp"
        (dead_dir / "sub").mkdir(parents=True)
        others = [tmp_path / ".hidden", tmp_path / "notes.tmp", tmp_path / "x.1.tmp"]
        for p in others:
            p.write_text("keep")
        removed = clean_stale(tmp_path)
        assert sorted(removed) == sorted([dead, dead_dir])
        assert live.exists() and all(p.exists() for p in others)
        assert not target.exists()
    finally:
        proc.kill()
        proc.wait()
    assert clean_stale(tmp_path) == [live]  # its writer is gone now


def test_a_kill_inside_the_folder_swap_gives_the_old_folder_back(tmp_path):
    """atomic_folder moves the old output aside, then the new one in: a kill between the two leaves only temporaries;
    the next clean-up restores the old one rather than deleting both."""
    pid = _dead_pid()
    old = tmp_path / f".merged.{pid}.old.tmp"
    (old / "config.json").parent.mkdir(parents=True)
    (old / "config.json").write_text("{}")
    new = tmp_path / f".merged.{pid}.x7y8z9.tmp"
    new.mkdir()
    clean_stale(tmp_path)
    assert (tmp_path / "merged" / "config.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_atomic_folder_replaces_on_success_and_keeps_the_old_one_on_error(tmp_path):
    out = tmp_path / "merged"
    with atomic_folder(out) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_folder(out) as tmp:
            (tmp / "a").write_text("2")
            raise RuntimeError("failed half-way")
    assert (out / "a").read_text() == "1"
    with atomic_folder(out) as tmp:
        (tmp / "b").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_outputs_get_the_usual_permissions(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    atomic_write_text(tmp_path / "f.txt", "x")
    with atomic_path(tmp_path / "p.png", suffix=".png") as tmp:
        assert tmp.suffix == ".png"
        tmp.write_bytes(b"png")
    for name in ("f.txt", "p.png"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600


def test_a_failed_write_names_the_output_not_the_temporary(tmp_path):
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(tmp_path)],
                                           capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root and mount permission)")
    try:
        with pytest.raises(OSError) as info:
            atomic_write_text(tmp_path / "big.json", "x" * 200_000)
        assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "big.json")
        assert fault_message(info.value) == (f"{tmp_path / 'big.json'}: no space left on device; free some space "
                                             "(or choose another output folder) and run again", 1)
        assert list(tmp_path.iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(tmp_path)])


# ---- cli.fault_message -------------------------------------------------------------------------------------------

def _raised(fn):
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 - the test wants whatever was raised
        return e
    raise AssertionError("nothing raised")


def test_os_errors_name_the_file_and_say_what_to_do(tmp_path):
    missing = _raised(lambda: open(tmp_path / "nope.jsonl"))
    assert fault_message(missing) == (f"{tmp_path / 'nope.jsonl'}: no such file or directory", 1)
    folder = _raised(lambda: open(tmp_path))
    assert fault_message(folder) == (f"{tmp_path}: is a folder, expected a file", 1)
    (tmp_path / "f").write_text("")
    under_file = _raised(lambda: (tmp_path / "f" / "out").mkdir())
    assert fault_message(under_file)[0] == f"{tmp_path / 'f' / 'out'}: a part of the path is a file, not a folder"
    assert fault_message(OSError(errno.ENOSPC, "No space left on device"))[0].startswith("No space left on device;")
    ro = OSError(errno.EROFS, "Read-only file system", "/mnt/x")
    assert fault_message(ro) == ("/mnt/x: read-only file system; choose a writable output folder", 1)


def test_a_port_in_use_and_a_refused_connection_are_one_line():
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    port = held.getsockname()[1]
    try:
        again = socket.socket()
        in_use = _raised(lambda: again.bind(("127.0.0.1", port)))
        again.close()
        assert fault_message(in_use)[0].startswith("Address already in use; choose another --port")
    finally:
        held.close()
    refused = _raised(lambda: socket.create_connection(("127.0.0.1", port), timeout=2))
    assert fault_message(refused)[0].startswith("Connection refused; is the server running")


def test_faults_wrapped_by_a_library_are_found_in_the_chain(tmp_path):
    def wrapped_explicitly():
        try:
            open(tmp_path / "gone")
        except OSError as e:
            raise RuntimeError("loading failed") from e

    def wrapped_implicitly():
        try:
            json.loads((tmp_path / "gone").read_text())
        except OSError:
            raise ValueError("could not read the config")

    for fn in (wrapped_explicitly, wrapped_implicitly):
        assert fault_message(_raised(fn)) == (f"{tmp_path / 'gone'}: no such file or directory", 1)
    disk = RuntimeError('Error while serializing: IoError(Os { code: 28, message: "No space left on device" })')
    assert fault_message(disk)[0].startswith("No space left on device;")
    assert fault_message(ModuleNotFoundError("No module named 'bm25s'", name="bm25s")) == (
        "the Python package 'bm25s' is not installed; install it with: pip install -e '.[bench]'", 1)


def test_user_errors_are_their_first_line_with_their_exit_status():
    assert fault_message(UserError("data.jsonl:3: bad JSON\nmore detail")) == ("data.jsonl:3: bad JSON", 1)
    assert fault_message(UsageError("command line: --lora-r: not an integer")) == (
        "command line: --lora-r: not an integer", 2)
    assert fault_message(KeyboardInterrupt()) == ("interrupted", 130)
    wrapped = _raised(lambda: _reraise(UserError("model.gguf: not a GGUF file")))
    assert fault_message(wrapped) == ("model.gguf: not a GGUF file", 1)


def _reraise(e):
    try:
        raise e
    except UserError as inner:
        raise RuntimeError("library wrapper") from inner


def test_a_bug_stays_a_bug_even_while_handling_a_fault(tmp_path):
    assert fault_message(KeyError("query")) is None
    assert fault_message(ValueError("bad value")) is None
    assert fault_message(ModuleNotFoundError("No module named 'qmd_unsloth.nope'", name="qmd_unsloth.nope")) is None

    def buggy_handler():
        try:
            open(tmp_path / "gone")
        except OSError as e:
            e.no_such_attribute.call()  # a bug in an except block: the OSError must not hide it

    assert isinstance(_raised(buggy_handler), AttributeError)
    assert fault_message(_raised(buggy_handler)) is None


def test_command_prints_one_line_for_a_fault_and_reraises_a_bug(capsys):
    @command("demo")
    def fails(kind):
        if kind == "fault":
            raise UserError("input.jsonl: empty")
        if kind == "exit":
            raise SystemExit(3)
        return {}["bug"]

    assert fails("fault") == 1
    assert capsys.readouterr().err == "error: input.jsonl: empty\n"
    with pytest.raises(SystemExit):
        fails("exit")
    with pytest.raises(KeyError):
        fails("bug")


def test_ctrl_c_exits_130_without_a_traceback(tmp_path):
    target = tmp_path / "t.txt"
    target.write_text("old")
    code = f"""
import os, signal, sys, time
sys.path.insert(0, {str(REPO)!r})
from qmd_unsloth.atomic import atomic_write_text
from qmd_unsloth.cli import command
@command("demo")
def main():
    atomic_write_text({str(target)!r}, "new")
    print("ready", flush=True)
    time.sleep(60)
sys.exit(main())
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=as_in_a_terminal)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and err.strip() == "demo: interrupted" and target.read_text() == "new"


def test_a_closed_output_pipe_stops_quietly(tmp_path):
    """`python -m qmd_unsloth.reward -v rows.jsonl | head -1`: no BrokenPipeError traceback."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"query": f"docker volumes {i}", "completion": "lex: docker volumes"}) + "\n"
                            for i in range(4000)))  # far more output than a pipe holds
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "qmd_unsloth.reward", "-v", str(rows)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=REPO)
    proc.stdout.read(10)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert "Traceback" not in err and proc.returncode == 141, err


# ---- leftovers are never taken for results -----------------------------------------------------------------------

def test_resume_skips_a_checkpoint_cut_short(tmp_path):
    from qmd_unsloth.runs import last_checkpoint

    ckpts = tmp_path / "checkpoints"
    for step, complete in ((10, True), (20, True), (30, False)):  # 30: killed while saving (no trainer_state.json)
        (ckpts / f"checkpoint-{step}").mkdir(parents=True)
        (ckpts / f"checkpoint-{step}" / "adapter_model.safetensors").write_bytes(b"w")
        if complete:
            (ckpts / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (ckpts / "checkpoint-x").mkdir()
    assert last_checkpoint(tmp_path) == str(ckpts / "checkpoint-20")
    assert last_checkpoint(tmp_path / "none") is None


def test_latest_link_moves_in_one_step_and_leaves_no_temporary(tmp_path):
    from qmd_unsloth import config as C
    from qmd_unsloth.runs import start

    first = start(C.load(C.SFTConfig, None, output_dir=tmp_path, run_name="a"), "sft", resume=False)
    second = start(C.load(C.SFTConfig, None, output_dir=tmp_path, run_name="b"), "sft", resume=False)
    latest = tmp_path / "sft" / "latest"
    assert latest.is_symlink() and latest.resolve() == second.resolve() and first.is_dir()
    assert sorted(p.name for p in (tmp_path / "sft").iterdir()) == ["a", "b", "latest"]
    assert (second / "config.yaml").is_file() and not [p for p in second.iterdir() if is_temporary(p)]
