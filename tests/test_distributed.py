"""Two processes on CPU (gloo), launched by torchrun and by accelerate launch, on the tiny model.

What must hold whatever the number of processes: one run folder (named by the main process), one merged model,
the same train/val split, the effective batch recorded, a loss curve equal to a one-process run with the same
effective batch, resume, and a clean stop on SIGTERM.
"""

import json
import os
import signal
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path

import pytest

from qmd_unsloth import dist
from tests.conftest import REPO

BIN = Path(sys.executable).parent
TINY_ARGS = ["--max-seq-length", "256", "--logging-steps", "1", "--use-cpu", "--report-to", "[]"]


def launch(launcher: str, module: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m module`` (launcher "one"), or under torchrun / accelerate launch with two CPU processes."""
    head = {
        "one": [sys.executable, "-m"],
        "torchrun": [str(BIN / "torchrun"), "--nproc_per_node", "2", "-m"],
        "accelerate": [str(BIN / "accelerate"), "launch", "--config_file", str(REPO / "configs/accelerate/cpu2.yaml"),
                       "-m"],
    }[launcher]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([*head, module, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """A small slice of the shipped data."""
    from qmd_unsloth.data import load_examples

    rows = load_examples()[:40]
    p = tmp_path_factory.mktemp("data") / "slice.jsonl"
    p.write_text("".join(json.dumps({"query": e.query, "output": [list(x) for x in e.output]}) + "\n" for e in rows))
    return p


def sft_args(tiny_model, data_file, out, per_device: int, *more: str) -> list[str]:
    return ["--base-model", str(tiny_model), "--data", f'["{data_file}"]', "--output-dir", str(out),
            "--per-device-train-batch-size", str(per_device), "--gradient-accumulation-steps", "1",
            "--learning-rate", "1e-2", "--save-steps", "2", "--eval-steps", "4", "--val-fraction", "0.2",
            "--backend", "hf", *TINY_ARGS, *more]


def runs_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith("."))


def losses(run: Path) -> list[float]:
    return [h["loss"] for h in json.loads((run / "metrics.json").read_text())["log_history"] if "loss" in h]


@pytest.fixture(scope="module")
def two_process_sft(tiny_model, data_file, tmp_path_factory):
    """SFT under torchrun, 2 processes x 2 sequences, 4 steps, no run name: the main process names the folder."""
    out = tmp_path_factory.mktemp("two")
    r = launch("torchrun", "qmd_unsloth.sft", *sft_args(tiny_model, data_file, out, 2, "--max-steps", "4"))
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def test_torchrun_sft_writes_one_run_folder_and_one_merged_model(two_process_sft):
    out, r = two_process_sft
    (run,) = runs_in(out / "sft")  # both ranks used the one name the main process chose
    assert (out / "sft" / "latest").resolve() == run
    for name in ("config.yaml", "versions.json", "data.json", "metrics.json", "loss.png", "merged/model.safetensors",
                 "checkpoints/checkpoint-2/adapter_model.safetensors", "checkpoints/checkpoint-4/trainer_state.json"):
        assert (run / name).is_file(), name
    assert not [p.name for p in run.rglob(".*.tmp*")]  # no leftovers of two writers racing
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["effective_batch_size"] == 4 and metrics["parallelism"] == "ddp"
    assert metrics["global_step"] == 4
    assert '"effective_batch_size": 4' in (run / "config.yaml").read_text()
    # printed once, by the main process, with how the effective batch is made
    assert r.stdout.count("effective_batch_size 4") == 1
    assert "(2 per device x 1 accumulation x 2 processes)" in r.stdout
    assert r.stdout.count("merged model written") == 1
    assert "Unsloth" not in r.stdout + r.stderr  # the transformers + peft path never imports unsloth


def test_two_processes_match_one_process_with_the_same_effective_batch(two_process_sft, tiny_model, data_file,
                                                                      tmp_path):
    """One process x 4 sequences against two x 2.  The same seeded LoRA init (DDP copies rank 0's), the same
    seeded sample order split across ranks, and the loss averaged over the tokens of all ranks
    (average_tokens_across_devices): the steps are the same arithmetic, reduced in another order, so float32
    rounding (~1e-7 relative) is all that may differ; 1e-4 relative leaves room for its growth over 4 steps at lr
    1e-2 and still fails on any real difference (a changed sample order moves the losses by ~1e-2)."""
    out, _ = two_process_sft
    (two,) = runs_in(out / "sft")
    r = launch("one", "qmd_unsloth.sft", *sft_args(tiny_model, data_file, tmp_path, 4, "--max-steps", "4"))
    assert r.returncode == 0, r.stderr[-3000:]
    (one,) = runs_in(tmp_path / "sft")
    assert json.loads((one / "metrics.json").read_text())["effective_batch_size"] == 4
    a, b = losses(one), losses(two)
    assert len(a) == len(b) == 4
    assert b == pytest.approx(a, rel=1e-4)
    assert a[-1] < a[0]  # it learned something: the comparison is not between two flat lines
    # the data split is the same whatever the number of processes (a seeded hash of each query)
    for name in ("train.jsonl", "val.jsonl"):
        assert (one / "data" / name).read_bytes() == (two / "data" / name).read_bytes()
    m1, m2 = (json.loads((p / "metrics.json").read_text()) for p in (one, two))
    assert m1["split_sha256"] == m2["split_sha256"] and m1["train_rows"] == m2["train_rows"]


def test_resume_a_two_process_run_with_accelerate_launch(two_process_sft, tiny_model, data_file):
    out, _ = two_process_sft
    (run,) = runs_in(out / "sft")
    before = losses(run)
    r = launch("accelerate", "qmd_unsloth.sft",
               *sft_args(tiny_model, data_file, out, 2, "--max-steps", "6", "--run-name", run.name, "--resume"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stdout and "checkpoint-4" in r.stdout and "world_size 2" in r.stdout
    assert runs_in(out / "sft") == [run]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_step"] == 6 and metrics["world_size"] == 2
    assert losses(run)[:4] == before  # the first four steps come back from the checkpoint's trainer state
    assert (run / "checkpoints" / "checkpoint-6").is_dir() and (run / "merged" / "model.safetensors").is_file()


def test_grpo_two_processes_under_accelerate_launch(tiny_model, data_file, tmp_path):
    r = launch("accelerate", "qmd_unsloth.grpo", "--sft-model", str(tiny_model), "--data", f'["{data_file}"]',
               "--output-dir", str(tmp_path), "--max-steps", "2", "--per-device-train-batch-size", "2",
               "--gradient-accumulation-steps", "1", "--num-generations", "2", "--max-completion-length", "8",
               "--save-steps", "2", "--backend", "hf",
               *TINY_ARGS)
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = runs_in(tmp_path / "grpo")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["effective_batch_size"] == 4 and metrics["global_step"] == 2
    logged = [h for h in metrics["log_history"] if "reward" in h]
    assert logged and "kl" in logged[0]
    # 4 completions per step: 2 per process, each prompt's 2 generations scored as one group
    assert logged[0]["num_tokens"] > 0
    assert (run / "reward.png").is_file() and (run / "merged" / "model.safetensors").is_file()
    assert r.stdout.count("merged model written") == 1
    assert "Unsloth" not in r.stdout + r.stderr


# Slow (excluded from the default run): on 2 CPU cores with gloo, one of three runs here ended with rank 1 aborting at
# exit ("terminate called without an active exception") during the resume.  The two-process resume stays in CI
# through test_resume_a_two_process_run_with_accelerate_launch; run this one with `pytest -m slow`.
@pytest.mark.slow
def test_ctrl_c_under_torchrun_saves_one_checkpoint_and_the_run_resumes(tiny_model, data_file, tmp_path):
    """Ctrl-C in a terminal sends SIGINT to the foreground process group; torchrun forwards it to its workers (they
    run in sessions of their own).  The ranks agree to stop after the same step and the main process saves one
    checkpoint that resumes."""
    args = [str(BIN / "torchrun"), "--nproc_per_node", "2", "-m", "qmd_unsloth.sft",
            *sft_args(tiny_model, data_file, tmp_path, 1, "--max-steps", "400", "--save-steps", "1000",
                      "--run-name", "r")]
    log = tmp_path / "stderr.log"
    with log.open("w") as err_fh:
        proc = subprocess.Popen(args, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                                stdout=subprocess.PIPE, stderr=err_fh, text=True, start_new_session=True)
        for line in proc.stdout:  # printed once the stop handler is installed, just before training starts
            if line.startswith("sft: backend"):
                break
        time.sleep(3)  # a few steps
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        proc.communicate(timeout=120)
    err = log.read_text()
    assert proc.returncode != 0
    run = tmp_path / "sft" / "r"
    assert err.count("continue with --resume") == 1, err[-3000:]
    (ckpt,) = (run / "checkpoints").glob("checkpoint-*")
    assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "trainer_state.json").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["interrupted"] is True and metrics["global_step"] == int(ckpt.name.split("-")[1])
    step = metrics["global_step"]
    r = launch("torchrun", "qmd_unsloth.sft",
               *sft_args(tiny_model, data_file, tmp_path, 1, "--max-steps", str(step + 1), "--run-name", "r",
                         "--resume"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"checkpoint-{step}" in r.stdout
    assert json.loads((run / "metrics.json").read_text())["global_step"] == step + 1


@pytest.mark.skipif(find_spec("unsloth") is None, reason="unsloth not installed (.ci/run installs its CPU backend)")
def test_unsloth_backend_runs_under_torchrun(tiny_model, data_file, tmp_path):
    """Unsloth documents DDP through accelerate launch / torchrun; its CPU backend runs it here."""
    args = sft_args(tiny_model, data_file, tmp_path, 2, "--max-steps", "2")
    args[args.index("--backend") + 1] = "unsloth"
    r = launch("torchrun", "qmd_unsloth.sft", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "sft: backend unsloth" in r.stdout and "world_size 2" in r.stdout
    (run,) = runs_in(tmp_path / "sft")
    assert json.loads((run / "metrics.json").read_text())["world_size"] == 2
    assert (run / "merged").is_dir()


def test_fsdp_with_the_unsloth_backend_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(dist, "_on_cpu", False)  # an earlier in-process CPU run (dist.init) must not leak in here
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(dist.DistributedError, match="--backend hf"):
        dist.check_backend("unsloth")
    dist.check_backend("hf")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    dist.check_backend("unsloth")  # DDP: Unsloth's documented route


def test_adapter_merge_used_under_fsdp_equals_the_in_memory_merge(tiny_model, tmp_path):
    """Under FSDP no rank holds whole weights, so the main process merges the gathered adapter into a fresh 16-bit
    base (runs.merge_adapter); it must give the weights merge_and_unload gives in memory.  (accelerate runs FSDP on
    GPUs only, so the launch itself is not exercised here.)"""
    import torch
    from safetensors.torch import load_file

    from qmd_unsloth import config as C
    from qmd_unsloth.model import load_for_training, save_merged
    from qmd_unsloth.runs import merge_adapter

    cfg = C.load(C.SFTConfig, None, use_cpu=True, backend="hf")
    model, tok, _ = load_for_training(str(tiny_model), cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # a trained-looking adapter: B starts at zero
    model.save_pretrained(tmp_path / "adapter")
    merge_adapter(tmp_path / "adapter", tok, tmp_path / "from_adapter", str(tiny_model))
    save_merged(model, tok, tmp_path / "in_memory", "hf")
    a = load_file(tmp_path / "from_adapter" / "model.safetensors")
    b = load_file(tmp_path / "in_memory" / "model.safetensors")
    assert a.keys() == b.keys()
    base = load_file(tiny_model / "model.safetensors")
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-2, atol=2e-3), k  # bf16 copy vs the fp32 merge
    q = next(k for k in a if "q_proj.weight" in k)
    assert not torch.allclose(a[q].float(), base[q].float(), atol=1e-3)  # the adapter really was merged in
    assert not (tmp_path / "adapter").exists()  # the gathered adapter is removed once merged


def test_qwen3_presets_load_and_keep_the_effective_batch():
    """The 4B/8B presets are valid stage configs; SFT keeps the effective batch 16 on one card or two."""
    from qmd_unsloth import config as C

    files = sorted((REPO / "configs" / "presets").glob("*-qwen3-*.yaml"))
    assert len(files) == 9
    for f in files:
        stage = f.name.split("-")[0]
        cfg = C.load(C.STAGES[stage], f)
        gpus = 2 if "-2x" in f.name else 1
        batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * gpus
        if stage == "sft":
            assert batch == 16 and cfg.base_model.startswith("Qwen/Qwen3-"), f.name
        else:
            assert batch % cfg.num_generations == 0, f.name
