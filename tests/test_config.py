import pytest

from qmd_unsloth.config import ConfigError, GRPOConfig, SFTConfig, load
from tests.conftest import REPO, run_module


def test_defaults_follow_the_recipe():
    sft = load(SFTConfig, REPO / "configs" / "sft.yaml")
    assert (sft.lora_r, sft.lora_alpha, sft.learning_rate, sft.num_train_epochs, sft.max_seq_length) == (16, 32, 2e-4, 5, 512)
    assert sft.per_device_train_batch_size * sft.gradient_accumulation_steps == 16
    assert sft.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    grpo = load(GRPOConfig, REPO / "configs" / "grpo.yaml")
    assert (grpo.lora_r, grpo.lora_alpha, grpo.beta, grpo.num_generations, grpo.max_steps) == (4, 8, 0.04, 8, 200)
    assert grpo.target_modules == ["q_proj", "v_proj"] and grpo.learning_rate == 2e-5


def _prompts_per_step(cfg, gpus=1):
    # TRL 1.14: one generation batch of per_device x accumulation x processes completions per optimizer step
    completions = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * gpus
    assert completions % cfg.num_generations == 0
    return completions // cfg.num_generations


def test_grpo_defaults_learn_on_a_home_card_and_sample_as_qmd():
    from qmd_unsloth.qmd_contract import SAMPLING

    for cfg in (load(GRPOConfig), load(GRPOConfig, REPO / "configs" / "grpo.yaml")):
        assert _prompts_per_step(cfg) == 4 and cfg.num_generations == 8  # several prompts, groups of 8
        assert (cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_p) == (
            SAMPLING["temperature"], SAMPLING["top_k"], SAMPLING["top_p"], SAMPLING["min_p"])
        assert cfg.repetition_penalty == SAMPLING["repeat_penalty"] == 1.0
    # every GRPO preset keeps 4 prompts x 8 generations per step, on one card or two
    presets = sorted((REPO / "configs" / "presets").glob("grpo-*.yaml"))
    assert len(presets) == 7
    for f in presets:
        cfg = load(GRPOConfig, f)
        assert _prompts_per_step(cfg, 2 if "-2x" in f.name else 1) == 4 and cfg.num_generations == 8, f.name
        assert cfg.temperature == SAMPLING["temperature"], f.name


def test_precedence_flags_over_env_over_yaml(tmp_path, monkeypatch):
    y = tmp_path / "c.yaml"
    y.write_text("lora_r: 8\nlora_alpha: 16\nlearning_rate: 1.0e-4\n")
    assert load(SFTConfig, y).lora_r == 8
    monkeypatch.setenv("QMD_UNSLOTH_SFT_LORA_R", "12")
    monkeypatch.setenv("QMD_UNSLOTH_SFT_LORA_ALPHA", "24")
    cfg = load(SFTConfig, y, ["--lora-r", "32"])
    assert (cfg.lora_r, cfg.lora_alpha, cfg.learning_rate) == (32, 24, 1e-4)


@pytest.mark.parametrize("yaml_text, args, env, message", [
    ("lora_rr: 3\n", [], {}, "c.yaml: unknown key 'lora_rr'"),
    ("lora_r: abc\n", [], {}, "c.yaml: lora_r: Input should be a valid integer"),
    ("", ["--lora-r", "x"], {}, "command line: lora_r: Input should be a valid integer"),
    ("", ["--no-such-flag", "1"], {}, "command line: unrecognized arguments: --no-such-flag"),
    ("", [], {"QMD_UNSLOTH_SFT_LEARNING_RATE": "-1"}, "environment QMD_UNSLOTH_SFT_LEARNING_RATE: learning_rate"),
    ("target_modules: [q_proj, lm_head]\n", [], {}, "lm_head must not be trained"),
    ("- a\n- b\n", [], {}, "must hold a mapping"),
    ("lora_r: [\n", [], {}, "not valid YAML"),
])
def test_bad_config_is_one_line_naming_the_key(tmp_path, monkeypatch, yaml_text, args, env, message):
    y = tmp_path / "c.yaml"
    y.write_text(yaml_text)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError) as e:
        load(SFTConfig, y, args)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_grpo_batch_must_divide_into_generations():
    with pytest.raises(ConfigError, match="divisible by num_generations"):
        load(GRPOConfig, None, ["--num-generations", "3"])


@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_dry_run_prints_the_resolved_config(stage):
    r = run_module(f"qmd_unsloth.{stage}", "--config", f"configs/{stage}.yaml", "--dry-run", "--lora-r", "7",
                   env={f"QMD_UNSLOTH_{stage.upper()}_SEED": "5"})
    assert r.returncode == 0, r.stderr
    assert "lora_r: 7\n" in r.stdout and "seed: 5\n" in r.stdout


def test_stage_bad_flag_is_a_one_line_error_without_traceback():
    r = run_module("qmd_unsloth.sft", "--config", "configs/sft.yaml", "--lora-r", "many", "--dry-run")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == ["error: command line: lora_r: Input should be a valid integer, unable "
                                             "to parse string as an integer (got 'many')"]


def test_package_lists_its_stages():
    r = run_module("qmd_unsloth")
    assert r.returncode == 0
    for stage in ("data", "reward", "sft", "grpo"):
        assert f"  {stage} " in r.stdout
