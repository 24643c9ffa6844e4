"""GRPO: a new small LoRA on the merged SFT model, rewarded by qmd_unsloth.reward, KL beta > 0.

    python -m qmd_unsloth.grpo --config configs/grpo.yaml [--resume] [--dry-run] [--key value ...]

Prompts are rendered by qmd_unsloth.prompt exactly as in SFT and serving; the reward receives the ``query`` and ``lang`` columns.
Generation goes through vLLM (Unsloth ``fast_inference``) when vLLM is installed, plain generate otherwise.
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

from .cli import command
from .config import GRPOConfig


def use_vllm(cfg: GRPOConfig, backend: str) -> bool:
    if cfg.use_vllm == "off" or backend != "unsloth":
        return False
    available = find_spec("vllm") is not None
    if cfg.use_vllm == "on" and not available:
        from .model import ModelLoadError

        raise ModelLoadError("use_vllm: on, but vllm is not installed")
    return available


def prompt_dataset(cfg: GRPOConfig, tokenizer, run: Path):
    """Training queries rendered with the model's template: columns ``prompt`` (text), ``query`` and ``lang`` (the
    reward reads both)."""
    from datasets import load_dataset

    from .data import prepare

    prepare(run / "data", cfg.data, cfg.seed, cfg.val_fraction, chat_template=tokenizer.chat_template)
    ds = load_dataset("json", data_files={"train": str(run / "data" / "train.jsonl")})["train"]
    return ds.remove_columns([c for c in ds.column_names if c not in ("prompt", "query", "lang")])


def build_trainer(cfg: GRPOConfig, run: Path):
    from .model import add_lora, choose_backend, load_base
    from .reward import grpo_reward

    backend = choose_backend(cfg.backend, cfg.use_cpu)
    fast = use_vllm(cfg, backend)
    if fast:
        from unsloth import FastLanguageModel

        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=cfg.sft_model, max_seq_length=cfg.max_seq_length, load_in_4bit=cfg.load_in_4bit,
            fast_inference=True, max_lora_rank=cfg.lora_r)
    else:
        model, tokenizer = load_base(cfg.sft_model, cfg, backend)
    model = add_lora(model, cfg, backend)
    train = prompt_dataset(cfg, tokenizer, run)

    from trl import GRPOConfig as TRLGRPOConfig
    from trl import GRPOTrainer

    from .runs import training_args

    args = TRLGRPOConfig(
        **training_args(cfg, run, backend),
        beta=cfg.beta,
        num_generations=cfg.num_generations,
        max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature,
        use_vllm=fast,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=[grpo_reward], args=args, train_dataset=train,
                          processing_class=tokenizer)
    return trainer, tokenizer, backend, len(train)


def run(cfg: GRPOConfig, resume: bool = False) -> Path:
    """Trains, writes the run folder, and returns the path of the merged model."""
    from .runs import train_stage

    def build(cfg, run_path):
        trainer, tokenizer, backend, n = build_trainer(cfg, run_path)
        return trainer, tokenizer, backend, {"prompts": n, "generations": cfg.num_generations}

    return train_stage("grpo", cfg, resume, build, ("reward", "kl"), "reward.png", cfg.sft_model)


@command("grpo")
def main(argv: list[str] | None = None) -> int:
    from .runs import stage_main

    return stage_main("grpo", __doc__, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
