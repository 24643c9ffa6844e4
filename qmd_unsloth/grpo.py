"""GRPO: a new small LoRA on the merged SFT model, rewarded by qmd_unsloth.reward, KL beta > 0.

    python -m qmd_unsloth.grpo --config configs/grpo.yaml [--resume] [--dry-run] [--key value ...]

Prompts are rendered by qmd_unsloth.prompt exactly as in SFT and serving; the reward receives the ``query`` and ``lang`` columns.
Generation goes through vLLM (Unsloth ``fast_inference``) when vLLM is installed, plain generate otherwise.
"""

from __future__ import annotations

import json
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


def prompt_dataset(cfg: GRPOConfig, chat_format, run: Path):
    """Training queries rendered as QMD feeds the model (``chat_format``: its node-llama-cpp wrapper): columns
    ``prompt`` (text), ``query`` and ``lang`` (the rewards read them).  From ``cfg.prompts`` (a queries file) when
    given, else the training split of ``cfg.data``."""
    from datasets import Dataset, load_dataset

    from .runs import prepare_data

    if cfg.prompts is not None:
        from . import dist
        from .atomic import atomic_write_text
        from .eval import query_language, read_queries
        from .prompt import render_prompt

        rows = [{"prompt": render_prompt(q, chat_format), "query": q, "lang": query_language(cat, q)}
                for cat, q in read_queries(cfg.prompts)]
        if dist.is_main_process():  # every rank builds the same rows; the main process keeps the record
            atomic_write_text(run / "data" / "prompts.jsonl",
                              "".join(json.dumps(r, ensure_ascii=False) + chr(10) for r in rows))
        return Dataset.from_list(rows)
    prepare_data(run, cfg, chat_format)  # written once, by the main process
    ds = load_dataset("json", data_files={"train": str(run / "data" / "train.jsonl")})["train"]
    return ds.remove_columns([c for c in ds.column_names if c not in ("prompt", "query", "lang")])


def reward_functions(cfg: GRPOConfig) -> tuple[list, list[float]]:
    """The reward functions and their weights: the rule reward, plus the retrieval reward when it is on."""
    from .reward import grpo_reward

    funcs = [grpo_reward]
    if cfg.retrieval_weight > 0:
        from .retrieval_reward import RetrievalReward, combined

        sources = [(cfg.retrieval_collection, cfg.retrieval_qrels)] + [(s.collection, s.qrels)
                                                                       for s in cfg.retrieval_more]
        funcs.append(combined([RetrievalReward(c, q, mode=cfg.retrieval_mode, clip=cfg.retrieval_clip)
                               for c, q in sources]))
    return funcs, reward_weights(cfg)


def reward_weights(cfg: GRPOConfig) -> list[float]:
    return [cfg.rules_weight] + ([cfg.retrieval_weight] if cfg.retrieval_weight > 0 else [])


# The GRPO knobs set explicitly on both backends (Unsloth's patched GRPOConfig would otherwise replace TRL's defaults:
# unsloth/models/rl.py, the grpo_trainer replacements and the dr_grpo / dapo checks).
GRPO_SETTINGS = ("loss_type", "beta", "scale_rewards", "importance_sampling_level", "mask_truncated_completions",
                 "epsilon_high", "vllm_importance_sampling_correction")


def grpo_settings(cfg: GRPOConfig, fast: bool) -> dict:
    """TRL GRPOConfig arguments that fix what GRPO means (the importance-sampling correction applies to vLLM only)."""
    out = {k: getattr(cfg, k) for k in GRPO_SETTINGS}
    out["vllm_importance_sampling_correction"] = cfg.vllm_importance_sampling_correction and fast
    return out


def build_trainer(cfg: GRPOConfig, run: Path):
    from .model import add_lora, choose_backend, load_base

    funcs, weights = reward_functions(cfg)  # first: a bad collection fails before the model loads
    backend = choose_backend(cfg.backend, cfg.use_cpu)
    fast = use_vllm(cfg, backend)
    if backend == "unsloth":
        from .model import import_unsloth

        import_unsloth(vllm_standby=cfg.vllm_standby and fast)  # standby is read when unsloth is imported
    if fast:
        from unsloth import FastLanguageModel

        # With standby on, Unsloth replaces gpu_memory_utilization by its own figure unless
        # UNSLOTH_VLLM_STANDBY_UTIL_OVERRIDE=1 (unsloth_zoo/vllm_utils.py load_vllm).
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=cfg.sft_model, max_seq_length=cfg.max_seq_length, load_in_4bit=cfg.load_in_4bit,
            fast_inference=True, max_lora_rank=cfg.lora_r, gpu_memory_utilization=cfg.gpu_memory_utilization)
    else:
        model, tokenizer = load_base(cfg.sft_model, cfg, backend)
    model = add_lora(model, cfg, backend)
    from .prompt import model_chat_format

    train = prompt_dataset(cfg, model_chat_format(model, tokenizer), run)

    from trl import GRPOTrainer

    args, applied = trl_config(cfg, run, backend, fast, warn=False)
    trainer = GRPOTrainer(model=model, reward_funcs=funcs, args=args, train_dataset=train,
                          processing_class=tokenizer)
    trainer._qmd_trl_applied = applied
    return trainer, tokenizer, backend, len(train)


def trl_args(cfg: GRPOConfig, run: Path, backend: str, fast: bool) -> dict:
    """Our arguments of TRL's GRPOConfig (they win over the ``trl`` passthrough where both set one).  Sampling is
    QMD's (qmd_contract.SAMPLING through our keys temperature, top_k, top_p, min_p, repetition_penalty); TRL has no
    presence penalty (QMD's 0.5): transformers' generate has none, and vLLM's would make the backends differ."""
    from .runs import training_args

    return dict(
        **training_args(cfg, run, backend),
        num_generations=cfg.num_generations,
        max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        min_p=cfg.min_p or None,  # None: no min-p filter at all (0.0 would add a no-op warper)
        repetition_penalty=cfg.repetition_penalty,
        use_vllm=fast,
        reward_weights=reward_weights(cfg),
        **grpo_settings(cfg, fast),
    )


def trl_config(cfg: GRPOConfig, run: Path, backend: str, fast: bool, warn: bool = True):
    """(TRL's GRPOConfig with the ``trl`` passthrough, the passthrough values applied)."""
    from trl import GRPOConfig as TRLGRPOConfig

    from .trl_passthrough import build

    return build(TRLGRPOConfig, trl_args(cfg, run, backend, fast), cfg, warn)


def check(cfg: GRPOConfig) -> None:
    """The ``trl`` passthrough checked before the run folder is made and the model loads (see sft.check)."""
    if not cfg.trl:
        return
    from .model import choose_backend, import_unsloth

    backend = choose_backend(cfg.backend, cfg.use_cpu)
    fast = use_vllm(cfg, backend)
    if backend == "unsloth":
        import_unsloth(vllm_standby=cfg.vllm_standby and fast)  # as build_trainer does: standby is read at import
    trl_config(cfg, Path(cfg.output_dir) / "grpo" / ".check", backend, fast, warn=True)


def run(cfg: GRPOConfig, resume: bool = False) -> Path:
    """Trains, writes the run folder, and returns the path of the merged model."""
    from .runs import train_stage

    def build(cfg, run_path):
        trainer, tokenizer, backend, n = build_trainer(cfg, run_path)
        from .trl_passthrough import record

        used = {k: getattr(trainer.args, k) for k in GRPO_SETTINGS}  # as the trainer holds them, after any patching
        a = trainer.args
        batch = {"generations": cfg.num_generations, "generation_batch_size": a.generation_batch_size,
                 "steps_per_generation": a.steps_per_generation,
                 "prompts_per_step": a.per_device_train_batch_size * a.gradient_accumulation_steps * a.world_size
                 // cfg.num_generations}
        sampling = {k: getattr(a, k) for k in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")}
        return trainer, tokenizer, backend, {"prompts": n, **batch, "sampling": sampling, "grpo_settings": used,
                                             "trl_passthrough": record(a, trainer._qmd_trl_applied)}

    return train_stage("grpo", cfg, resume, build, ("reward", "reward_std", "kl"), "reward.png", cfg.sft_model,
                       check=check)


@command("grpo")
def main(argv: list[str] | None = None) -> int:
    from .runs import stage_main

    return stage_main("grpo", __doc__, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
