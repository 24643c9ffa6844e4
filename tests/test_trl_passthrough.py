"""The TRL passthrough (``trl:``): YAML, env and flags merge key by key, values reach the real trainers' arguments,
our own keys win (and say so), and bad names or values are one line naming the key and its source."""

import json
import subprocess
import sys

import pytest

from qmd_unsloth import config as C
from tests.conftest import REPO, run_module


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    from qmd_unsloth.data import load_examples

    rows = load_examples()[:24]
    p = tmp_path_factory.mktemp("data") / "slice.jsonl"
    p.write_text("".join(json.dumps({"query": e.query, "output": [list(x) for x in e.output]}) + "\n" for e in rows))
    return p


def test_yaml_env_and_flags_merge_key_by_key_and_remember_their_source(tmp_path, monkeypatch):
    y = tmp_path / "c.yaml"
    y.write_text("trl:\n  optim: adafactor\n  max_grad_norm: 0.5\n  neftune_noise_alpha: 5\n")
    monkeypatch.setenv("QMD_UNSLOTH_SFT_TRL", '{"max_grad_norm": 0.3, "use_liger_kernel": false}')
    cfg = C.load(C.SFTConfig, y, ["--trl", "neftune_noise_alpha=7,logging_first_step=true", "--trl",
                                  "seed=3"])
    assert cfg.trl == {"optim": "adafactor", "max_grad_norm": 0.3, "use_liger_kernel": False,
                       "neftune_noise_alpha": "7", "logging_first_step": "true", "seed": "3"}
    assert cfg._trl_sources == {"optim": str(y), "max_grad_norm": "environment QMD_UNSLOTH_SFT_TRL",
                                "use_liger_kernel": "environment QMD_UNSLOTH_SFT_TRL",
                                "neftune_noise_alpha": "command line", "logging_first_step": "command line",
                                "seed": "command line"}
    assert "trl:\n  optim: adafactor\n" in C.dump(cfg)  # the resolved config (and so every run folder) records it
    monkeypatch.delenv("QMD_UNSLOTH_SFT_TRL")
    assert C.load(C.SFTConfig, None).trl == {}
    # reading the config imports neither TRL nor torch (they are checked when the stage starts)
    r = run_module("qmd_unsloth.sft", "--trl", "optim=adafactor", "--dry-run")
    assert r.returncode == 0 and "trl:\n  optim: adafactor\n" in r.stdout, r.stderr
    code = ("import sys; from qmd_unsloth import config as C; C.load(C.SFTConfig, None, ['--trl', 'optim=x']); "
            "print(sorted(m for m in ('torch', 'trl', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.stdout.strip() == "[]", out.stderr


@pytest.mark.parametrize("yaml_text, env, message", [
    ("trl: 5\n", None, "c.yaml: trl: Input should be a valid dictionary (got 5)"),
    ("", "optim=adafactor", "environment QMD_UNSLOTH_SFT_TRL: not valid JSON"),
])
def test_a_passthrough_of_the_wrong_shape_is_one_line(tmp_path, monkeypatch, yaml_text, env, message):
    y = tmp_path / "c.yaml"
    y.write_text(yaml_text)
    if env:
        monkeypatch.setenv("QMD_UNSLOTH_SFT_TRL", env)
    with pytest.raises(C.ConfigError) as e:
        C.load(C.SFTConfig, y, [])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_names_and_values_are_checked_against_the_installed_trl(tmp_path, monkeypatch):
    from qmd_unsloth import sft, grpo
    from qmd_unsloth.trl_passthrough import PassthroughError

    def check(stage, mod, args, env=None):
        for k, v in (env or {}).items():
            monkeypatch.setenv(k, v)
        cfg = C.load(stage, None, ["--output-dir", str(tmp_path), "--use-cpu", "--backend", "hf", *args])
        with pytest.raises(PassthroughError) as e:
            mod.check(cfg)
        for k in env or {}:
            monkeypatch.delenv(k)
        return str(e.value)

    from importlib.metadata import version

    assert check(C.SFTConfig, sft, ["--trl", "max_grad_nrm=1"]) == (
        f"command line: trl.max_grad_nrm: not a field of TRL {version('trl')}'s SFTConfig (did you mean "
        "max_grad_norm?)")
    msg = check(C.SFTConfig, sft, [], {"QMD_UNSLOTH_SFT_TRL": '{"max_grad_norm": "abc"}'})
    assert msg == ("environment QMD_UNSLOTH_SFT_TRL: trl.max_grad_norm: Input should be a valid number, unable to "
                   "parse string as a number (got 'abc')")
    msg = check(C.GRPOConfig, grpo, ["--trl", "optim=nope"])  # TRL's own __post_init__ refuses it
    assert msg.startswith("command line: trl.optim: nope is not a valid OptimizerNames") and "\n" not in msg
    # a GRPO-only field is not an SFT field
    assert "trl.num_iterations: not a field of" in check(C.SFTConfig, sft, ["--trl", "num_iterations=2"])


def test_sft_run_passes_the_values_to_the_trainer_and_our_keys_win(tiny_model, data_file, tmp_path):
    """A real 2-step SFT run from the command line: the passthrough values are the trainer's arguments."""
    r = run_module("qmd_unsloth.sft", "--base-model", str(tiny_model), "--data", f'["{data_file}"]', "--output-dir",
                   str(tmp_path), "--run-name", "p", "--max-steps", "2", "--per-device-train-batch-size", "2",
                   "--gradient-accumulation-steps", "1", "--logging-steps", "1", "--save-steps", "2",
                   "--max-seq-length", "256", "--val-fraction", "0", "--use-cpu", "--backend", "hf",
                   "--report-to", "[]", "--trl", "max_grad_norm=0.25,optim=adafactor,neftune_noise_alpha=5",
                   "--trl", "learning_rate=1e-3")
    assert r.returncode == 0, r.stderr[-3000:]
    assert ("warning: command line: trl.learning_rate = 0.001 ignored: our own setting 0.0002 wins (set "
            "learning_rate instead)") in r.stderr
    assert r.stderr.count("trl.learning_rate") == 1  # said once
    run = tmp_path / "sft" / "p"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["trl_passthrough"] == {"max_grad_norm": 0.25, "optim": "adafactor", "neftune_noise_alpha": 5.0}
    assert metrics["global_step"] == 2
    saved = C.load(C.SFTConfig, run / "config.yaml")  # the run folder's resolved config records the passthrough
    assert saved.trl == {"max_grad_norm": "0.25", "optim": "adafactor", "neftune_noise_alpha": "5",
                         "learning_rate": "1e-3"}


def test_grpo_run_passes_the_values_to_the_trainer(tiny_model, data_file, tmp_path):
    """A real 2-step GRPO run: num_iterations and max_grad_norm from a YAML ``trl:`` mapping reach GRPOTrainer."""
    from qmd_unsloth import grpo

    y = tmp_path / "g.yaml"
    y.write_text("trl:\n  num_iterations: 2\n  max_grad_norm: 0.5\n  log_completions: true\n  top_k: 5\n")
    cfg = C.load(C.GRPOConfig, y, sft_model=str(tiny_model), data=[data_file], output_dir=tmp_path, run_name="g",
                 max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=1, num_generations=2,
                 max_completion_length=8, logging_steps=1, save_steps=2, use_cpu=True, backend="hf", report_to=[])
    merged = grpo.run(cfg)
    metrics = json.loads((merged.parent / "metrics.json").read_text())
    assert metrics["trl_passthrough"] == {"num_iterations": 2, "max_grad_norm": 0.5, "log_completions": True}
    assert metrics["sampling"]["top_k"] == 20  # our key (QMD's top-k) wins over trl.top_k
    assert metrics["global_step"] == 2
