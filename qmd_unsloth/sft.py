"""SFT: LoRA r16 on all projections of a 4-bit base, loss on the answer only, merged 16-bit model at the end.

    python -m qmd_unsloth.sft --config configs/sft.yaml [--resume] [--dry-run] [--key value ...]

Each run gets ``runs/sft/<name>/`` (see qmd_unsloth.runs); the merged model lands in ``<run>/merged``.
"""

from __future__ import annotations

from pathlib import Path

from .cli import command
from .config import SFTConfig


def prepare_datasets(cfg: SFTConfig, chat_format, run: Path):
    """Renders the data as QMD feeds the model (``chat_format``: its node-llama-cpp wrapper) into ``<run>/data`` and
    loads it with datasets."""
    from datasets import load_dataset

    from .runs import prepare_data

    meta = prepare_data(run, cfg, chat_format)  # written once, by the main process
    files = {"train": str(run / "data" / "train.jsonl")}
    if meta["val"]:
        files["val"] = str(run / "data" / "val.jsonl")
    ds = load_dataset("json", data_files=files)
    keep = ["prompt", "completion"]
    ds = ds.remove_columns([c for c in ds["train"].column_names if c not in keep])
    return ds["train"], ds.get("val"), meta


def build_trainer(cfg: SFTConfig, run: Path):
    """Loads the model with a fresh LoRA and returns (trainer, tokenizer, backend)."""
    from .model import load_for_training

    model, tokenizer, backend = load_for_training(cfg.base_model, cfg)
    from .prompt import model_chat_format

    train, val, meta = prepare_datasets(cfg, model_chat_format(model, tokenizer), run)

    from trl import SFTTrainer

    args, applied = trl_config(cfg, run, backend, has_val=val is not None, warn=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=val, processing_class=tokenizer)
    meta = {**meta, "trl_applied": applied}
    return trainer, tokenizer, backend, meta


def trl_args(cfg: SFTConfig, run: Path, backend: str, has_val: bool) -> dict:
    """Our arguments of TRL's SFTConfig (they win over the ``trl`` passthrough where both set one)."""
    from .runs import training_args

    return dict(
        **training_args(cfg, run, backend),
        max_length=cfg.max_seq_length,
        completion_only_loss=True,
        packing=cfg.packing,
        num_train_epochs=cfg.num_train_epochs,
        per_device_eval_batch_size=cfg.per_device_train_batch_size,
        eval_strategy="steps" if has_val else "no",
        eval_steps=cfg.eval_steps,
        dataset_num_proc=None,
    )


def trl_config(cfg: SFTConfig, run: Path, backend: str, has_val: bool, warn: bool = True):
    """(TRL's SFTConfig with the ``trl`` passthrough, the passthrough values applied)."""
    from trl import SFTConfig as TRLSFTConfig

    from .trl_passthrough import build

    return build(TRLSFTConfig, trl_args(cfg, run, backend, has_val), cfg, warn)


def check(cfg: SFTConfig) -> None:
    """The ``trl`` passthrough checked against the TRL config class the trainer will use, before the run folder is
    made and the model loads (a bad key is one line; an ignored one is warned about once, here)."""
    if not cfg.trl:
        return
    from .model import choose_backend, import_unsloth

    backend = choose_backend(cfg.backend, cfg.use_cpu)
    if backend == "unsloth":
        import_unsloth()  # before trl: on CUDA, Unsloth patches TRL's config classes
    trl_config(cfg, Path(cfg.output_dir) / "sft" / ".check", backend, has_val=cfg.val_fraction > 0, warn=True)


def run(cfg: SFTConfig, resume: bool = False) -> Path:
    """Trains, writes the run folder, and returns the path of the merged model."""
    from .runs import train_stage

    def build(cfg, run_path):
        trainer, tokenizer, backend, meta = build_trainer(cfg, run_path)
        from .trl_passthrough import record

        return trainer, tokenizer, backend, {"train_rows": meta["train"], "val_rows": meta["val"],
                                             "split_sha256": meta["split_sha256"][:16],
                                             "trl_passthrough": record(trainer.args, meta["trl_applied"])}

    return train_stage("sft", cfg, resume, build, ("loss", "eval_loss"), "loss.png", cfg.base_model, evaluate=True,
                       check=check)


@command("sft")
def main(argv: list[str] | None = None) -> int:
    from .runs import stage_main

    return stage_main("sft", __doc__, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
