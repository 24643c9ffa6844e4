"""SFT and GRPO on the tiny offline Qwen3 model, through the transformers + peft backend (CPU)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from qmd_unsloth import config as C
from tests.conftest import REPO, run_module


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """A small slice of the shipped data (keeps the tests fast)."""
    from qmd_unsloth.data import load_examples

    rows = load_examples()[:48]
    p = tmp_path_factory.mktemp("data") / "slice.jsonl"
    p.write_text("".join(json.dumps({"query": e.query, "output": [list(x) for x in e.output]}) + "\n" for e in rows))
    return p


def sft_cfg(tiny_model, data_file, out, **kw):
    base = dict(base_model=str(tiny_model), data=[data_file], output_dir=out, run_name="r", max_steps=4,
                per_device_train_batch_size=4, gradient_accumulation_steps=1, logging_steps=1, eval_steps=2,
                save_steps=2, max_seq_length=256, use_cpu=True, backend="hf", val_fraction=0.2)
    return C.load(C.SFTConfig, None, **{**base, **kw})


def test_loss_is_on_the_answer_only(tiny_model, data_file, tmp_path):
    from qmd_unsloth.sft import build_trainer

    cfg = sft_cfg(tiny_model, data_file, tmp_path)
    run = tmp_path / "run"
    trainer, tok, backend, _ = build_trainer(cfg, run)
    assert backend == "hf"
    rows = [json.loads(l) for l in (run / "data" / "train.jsonl").read_text().splitlines()]
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    for i in range(2):
        labels = batch["labels"][i]
        learned = tok.decode(labels[labels != -100].tolist(), skip_special_tokens=False)
        assert learned == rows[i]["completion"]  # the target and <|im_end|>, nothing of the prompt
        assert learned.startswith(("hyde: ", "lex: ")) and learned.endswith("<|im_end|>")
        full = tok.decode(batch["input_ids"][i][batch["attention_mask"][i] == 1].tolist(), skip_special_tokens=False)
        assert full == rows[i]["prompt"] + rows[i]["completion"]


def test_lora_targets_all_projections_and_never_embeddings(tiny_model):
    from qmd_unsloth.model import load_for_training

    cfg = C.load(C.SFTConfig, None, use_cpu=True, backend="hf")
    model, _, _ = load_for_training(str(tiny_model), cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    for proj in C.ALL_PROJECTIONS:
        assert any(f"{proj}.lora_A" in n for n in trainable), proj
    assert not any("embed_tokens" in n or "lm_head" in n for n in trainable)


def test_sft_cli_run_folder_contract_and_resume(tiny_model, data_file, tmp_path):
    yaml = tmp_path / "sft.yaml"
    yaml.write_text(f"base_model: {tiny_model}\ndata: [{data_file}]\noutput_dir: {tmp_path}\nrun_name: r\n"
                    "max_steps: 2\nper_device_train_batch_size: 4\ngradient_accumulation_steps: 1\nlogging_steps: 1\n"
                    "eval_steps: 2\nsave_steps: 2\nmax_seq_length: 256\nuse_cpu: true\nval_fraction: 0.2\n")
    r = run_module("qmd_unsloth.sft", "--config", str(yaml))
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "sft" / "r"
    for name in ("config.yaml", "versions.json", "data.json", "metrics.json", "loss.png"):
        assert (run / name).is_file(), name
    assert list((run / "tb").rglob("events.out.tfevents*"))
    versions = json.loads((run / "versions.json").read_text())
    assert versions["trl"]
    # the weights actually loaded are named (on the Unsloth 4-bit path, Unsloth's pre-quantized copy of a hub base)
    assert versions["weights"] == {"requested": str(tiny_model), "loaded": str(tiny_model)}
    assert (run / "config.yaml").read_text().startswith(f"# weights loaded: {tiny_model}\n")
    assert C.load(C.SFTConfig, run / "config.yaml").base_model == str(tiny_model)  # still a loadable config
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_step"] == 2 and "final_eval_loss" in metrics
    assert (tmp_path / "sft" / "latest").resolve() == run.resolve()

    r = run_module("qmd_unsloth.sft", "--config", str(yaml), "--resume", "--max-steps", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stdout and "checkpoint-2" in r.stdout
    assert json.loads((run / "metrics.json").read_text())["global_step"] == 4

    from qmd_unsloth.infer import expand, load

    model, tok = load(str(run / "merged"))
    assert len(expand(model, tok, ["auth config"], max_new_tokens=8)) == 1


def test_sigterm_saves_a_checkpoint_before_exiting(tiny_model, data_file, tmp_path):
    args = [sys.executable, "-m", "qmd_unsloth.sft", "--base-model", str(tiny_model), "--data", f'["{data_file}"]',
            "--output-dir", str(tmp_path), "--run-name", "r", "--max-steps", "500", "--save-steps", "1000",
            "--logging-steps", "1", "--per-device-train-batch-size", "2", "--gradient-accumulation-steps", "1",
            "--max-seq-length", "256", "--use-cpu", "--report-to", "[]"]
    proc = subprocess.Popen(args, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    ckpt_root = tmp_path / "sft" / "r" / "checkpoints"
    while time.time() < deadline and not ckpt_root.is_dir():
        time.sleep(0.5)
    time.sleep(3)  # let a few steps run
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "continue with --resume" in err
    ckpts = list(ckpt_root.glob("checkpoint-*"))
    assert ckpts and (ckpts[0] / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "sft" / "r" / "metrics.json").read_text())["interrupted"] is True


def test_offline_without_weights_is_a_one_line_error(tmp_path):
    r = run_module("qmd_unsloth.sft", "--base-model", "Qwen/Qwen3-1.7B", "--output-dir", str(tmp_path),
                   "--use-cpu", env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert r.returncode == 1 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: Qwen/Qwen3-1.7B: weights are not in the local Hugging Face cache")
    assert "HF_HUB_OFFLINE=1" in last
    r = run_module("qmd_unsloth.sft", "--base-model", "./no/such/model.gguf", "--output-dir", str(tmp_path))
    assert r.returncode == 1 and "GGUF file not found" in r.stderr and "Traceback" not in r.stderr


def test_grpo_rewards_with_the_query_column_and_writes_a_merged_model(tiny_model, data_file, tmp_path):
    from qmd_unsloth import grpo

    cfg = C.load(C.GRPOConfig, None, sft_model=str(tiny_model), data=[data_file], output_dir=tmp_path, run_name="g",
                 max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2, num_generations=2,
                 max_completion_length=16, logging_steps=1, save_steps=2, use_cpu=True, backend="hf", report_to=[])
    merged = grpo.run(cfg)
    metrics = json.loads((merged.parent / "metrics.json").read_text())
    # 2 completions x 2 accumulation / 2 generations = 2 distinct prompts per optimizer step, sampled as QMD samples
    assert (metrics["generation_batch_size"], metrics["steps_per_generation"], metrics["prompts_per_step"]) == (4, 2, 2)
    from qmd_unsloth.qmd_contract import SAMPLING

    assert metrics["sampling"] == {"temperature": SAMPLING["temperature"], "top_k": SAMPLING["top_k"],
                                   "top_p": SAMPLING["top_p"], "min_p": None, "repetition_penalty": 1.0}
    logged = [h for h in metrics["log_history"] if "reward" in h]
    assert logged and "rewards/qmd_expansion_reward/mean" in logged[0]
    assert "kl" in logged[0]  # beta > 0: the KL term is computed against the adapter-disabled model
    # the knobs Unsloth's patched GRPOConfig would otherwise change, as the trainer held them
    assert metrics["grpo_settings"] == {"loss_type": "dapo", "beta": 0.04, "scale_rewards": "group",
                                        "importance_sampling_level": "token", "mask_truncated_completions": False,
                                        "epsilon_high": 0.2, "vllm_importance_sampling_correction": False}
    assert (merged.parent / "reward.png").is_file() and (merged / "model.safetensors").is_file()
    rows = [json.loads(l) for l in (merged.parent / "data" / "train.jsonl").read_text().splitlines()]
    from qmd_unsloth.prompt import render_prompt

    assert rows[0]["prompt"] == render_prompt(rows[0]["query"])  # the same prompt as SFT and serving


@pytest.mark.skipif(__import__("importlib.util").util.find_spec("unsloth") is None,
                    reason="unsloth not installed (.ci/run installs it with --no-deps for its CPU backend)")
def test_unsloth_backend_sft_through_its_cpu_fallback(tiny_model, data_file, tmp_path):
    """The Unsloth code path (FastLanguageModel.from_pretrained / get_peft_model / save_pretrained_merged) on CPU.

    Run in a subprocess: importing unsloth patches transformers and trl for the whole process.  Unsloth's CPU
    backend loads 16-bit weights (no bitsandbytes on CPU) and supports SFT only, so GRPO's Unsloth path is left to
    the GPU suite.
    """
    r = run_module("qmd_unsloth.sft", "--base-model", str(tiny_model), "--data", f'["{data_file}"]', "--output-dir",
                   str(tmp_path), "--run-name", "u", "--max-steps", "2", "--per-device-train-batch-size", "2",
                   "--gradient-accumulation-steps", "1", "--logging-steps", "1", "--eval-steps", "2",
                   "--save-steps", "2", "--max-seq-length", "256", "--val-fraction", "0.2", "--backend", "unsloth",
                   "--report-to", "[]")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "sft: backend unsloth" in r.stdout
    run = tmp_path / "sft" / "u"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["backend"] == "unsloth" and metrics["global_step"] == 2
    from qmd_unsloth.infer import expand, load

    assert (run / "merged" / "model.safetensors").is_file()  # safetensors asked for, never a pickle
    assert json.loads((run / "versions.json").read_text())["weights"]["loaded"] == str(tiny_model)
    model, tok = load(str(run / "merged"))  # save_pretrained_merged wrote a loadable 16-bit model
    assert len(expand(model, tok, ["docker volumes"], max_new_tokens=4)) == 1


@pytest.mark.skipif(__import__("importlib.util").util.find_spec("unsloth") is None,
                    reason="unsloth not installed (.ci/run installs it with --no-deps for its CPU backend)")
def test_unsloth_backend_loss_is_on_the_answer_only(tiny_model, data_file, tmp_path):
    """As test_loss_is_on_the_answer_only, through the Unsloth backend (qmd_unsloth.model.load_for_training ->
    FastLanguageModel, Unsloth's CPU SFTTrainer and its label building) on Unsloth's CPU backend.  In a subprocess:
    importing unsloth patches transformers and trl for the whole process."""
    code = f"""
import json, sys
from pathlib import Path
from qmd_unsloth import config as C
from qmd_unsloth.sft import build_trainer
cfg = C.load(C.SFTConfig, None, base_model={str(tiny_model)!r}, data=[{str(data_file)!r}], output_dir={str(tmp_path)!r},
             run_name="u", max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=1,
             max_seq_length=256, backend="unsloth", report_to=[], val_fraction=0.2)
run = Path({str(tmp_path)!r}) / "run"
trainer, tok, backend, _ = build_trainer(cfg, run)
rows = [json.loads(l) for l in (run / "data" / "train.jsonl").read_text().splitlines()]
batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
out = {{"backend": backend, "model": type(trainer.model).__name__, "rows": []}}
for i in range(2):
    labels = batch["labels"][i]
    mask = batch["attention_mask"][i] == 1
    out["rows"].append({{"learned": tok.decode(labels[labels != -100].tolist(), skip_special_tokens=False),
                        "full": tok.decode(batch["input_ids"][i][mask].tolist(), skip_special_tokens=False),
                        "prompt": rows[i]["prompt"], "completion": rows[i]["completion"],
                        "masked": int((labels[mask] == -100).sum()),
                        "prompt_tokens": len(tok(rows[i]["prompt"], add_special_tokens=False)["input_ids"])}})
print("RESULT=" + json.dumps(out))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(next(l for l in r.stdout.splitlines() if l.startswith("RESULT="))[len("RESULT="):])
    assert out["backend"] == "unsloth"
    for row in out["rows"]:
        assert row["learned"] == row["completion"]  # the target and <|im_end|>, nothing of the prompt
        assert row["learned"].startswith(("hyde: ", "lex: ")) and row["learned"].endswith("<|im_end|>")
        assert row["full"] == row["prompt"] + row["completion"]
        assert row["masked"] == row["prompt_tokens"] > 0  # every prompt token, and only those, carries no loss
