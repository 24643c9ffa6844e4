"""SFT: LoRA r16 on all projections of a 4-bit base, loss on the answer only, merged 16-bit model at the end.

    python -m qmd_unsloth.sft --config configs/sft.yaml [--resume] [--dry-run] [--key value ...]

Each run gets ``runs/sft/<name>/`` (see qmd_unsloth.runs); the merged model lands in ``<run>/merged``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .config import SFTConfig, parse_stage_args, stage_parser


def prepare_datasets(cfg: SFTConfig, tokenizer, run: Path):
    """Renders the data with the model's own chat template into ``<run>/data`` and loads it with datasets."""
    from datasets import load_dataset

    from .data import prepare

    meta = prepare(run / "data", cfg.data, cfg.seed, cfg.val_fraction, chat_template=tokenizer.chat_template)
    files = {"train": str(run / "data" / "train.jsonl")}
    if meta["val"]:
        files["val"] = str(run / "data" / "val.jsonl")
    ds = load_dataset("json", data_files=files)
    keep = ["prompt", "completion"]
    ds = ds.remove_columns([c for c in ds["train"].column_names if c not in keep])
    return ds["train"], ds.get("val"), meta


def build_trainer(cfg: SFTConfig, run: Path):
    """Loads the model with a fresh LoRA and returns (trainer, tokenizer, backend)."""
    from .model import load_for_training, precision

    model, tokenizer, backend = load_for_training(cfg.base_model, cfg)
    if tokenizer.chat_template is None:
        from .prompt import qwen3_chat_template

        tokenizer.chat_template = qwen3_chat_template()
    train, val, meta = prepare_datasets(cfg, tokenizer, run)

    import os

    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run / "tb")
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    args = TRLSFTConfig(
        output_dir=str(run / "checkpoints"),
        max_length=cfg.max_seq_length,
        completion_only_loss=True,
        packing=cfg.packing,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        weight_decay=cfg.weight_decay,
        logging_steps=cfg.logging_steps,
        eval_strategy="steps" if val is not None else "no",
        eval_steps=cfg.eval_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        seed=cfg.seed,
        report_to=list(cfg.report_to),
        use_cpu=cfg.use_cpu,
        gradient_checkpointing=cfg.gradient_checkpointing and backend == "hf",
        dataset_num_proc=None,
        **precision(cfg.use_cpu),
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=val, processing_class=tokenizer)
    return trainer, tokenizer, backend, meta


def run(cfg: SFTConfig, resume: bool = False) -> Path:
    """Trains, writes the run folder, and returns the path of the merged model."""
    from .data import data_hash
    from .model import save_merged
    from .runs import finish, last_checkpoint, start, stop_callback

    run_path = start(cfg, "sft", resume, data_hash(cfg.data))
    trainer, tokenizer, backend, meta = build_trainer(cfg, run_path)
    stopper = stop_callback()
    trainer.add_callback(stopper)
    ckpt = last_checkpoint(run_path) if resume else None
    print(f"sft: backend {backend}, {meta['train']} train / {meta['val']} val rows, run folder {run_path}"
          + (f", resuming from {ckpt}" if ckpt else ""))
    trainer.train(resume_from_checkpoint=ckpt)
    extra = {"backend": backend, "train_rows": meta["train"], "val_rows": meta["val"]}
    if stopper.requested:
        finish(run_path, trainer, ("loss", "eval_loss"), "loss.png", {**extra, "interrupted": True})
        print(f"sft: stopped; checkpoint saved under {run_path / 'checkpoints'}; continue with --resume",
              file=sys.stderr)
        raise SystemExit(130)
    if trainer.eval_dataset is not None:
        trainer.log(trainer.evaluate())
    finish(run_path, trainer, ("loss", "eval_loss"), "loss.png", extra)
    merged = save_merged(trainer.model, tokenizer, run_path / "merged", backend, cfg.base_model, cfg)
    print(f"sft: merged model written to {merged}")
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("sft", __doc__.split("\n\n")[0])
    parser.add_argument("--resume", action="store_true", help="continue the latest (or --run-name) run")
    cfg, args = parse_stage_args("sft", __doc__, argv, parser)
    from .model import ModelLoadError

    try:
        run(cfg, resume=args.resume)
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
