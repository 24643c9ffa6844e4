"""Run folders: one per training run, holding the resolved config, library versions, data hash, metrics and plots.

Layout: ``<output_dir>/<stage>/<run_name>/`` with ``config.yaml``, ``versions.json``, ``data.json``,
``checkpoints/``, ``tb/`` (TensorBoard), ``metrics.json``, ``loss.png`` or ``reward.png``, ``merged/``.
``<output_dir>/<stage>/latest`` points at the newest run.  Ctrl-C or SIGTERM saves a checkpoint and stops;
``--resume`` continues from the last checkpoint.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .config import StageConfig, dump
from .atomic import atomic_write_text

LIBRARIES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "unsloth", "unsloth_zoo",
             "bitsandbytes", "vllm", "huggingface_hub", "pydantic-settings")


def library_versions() -> dict:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for lib in LIBRARIES:
        try:
            out[lib] = version(lib)
        except PackageNotFoundError:
            pass
    try:
        import torch

        out["cuda"] = torch.version.cuda
        out["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # torch missing or broken: versions are informational only
        pass
    return out


def run_dir(cfg, stage: str, resume: bool) -> Path:
    """The run folder: the named one, or with --resume the latest, or a new timestamped one."""
    root = Path(cfg.output_dir) / stage
    if cfg.run_name:
        return root / cfg.run_name
    latest = root / "latest"
    if resume and latest.exists():
        return latest.resolve()
    if resume:
        raise SystemExit(f"error: --resume: no earlier {stage} run under {root} (give --run-name)")
    return root / time.strftime(f"{stage}-%Y%m%d-%H%M%S")


def start(cfg: StageConfig, stage: str, resume: bool, data_hash: str | None = None) -> Path:
    path = run_dir(cfg, stage, resume)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path / "config.yaml", dump(cfg) + "\n")
    atomic_write_text(path / "versions.json", json.dumps(library_versions(), indent=2) + "\n")
    if data_hash:
        atomic_write_text(path / "data.json", json.dumps({"data_hash": data_hash}, indent=2) + "\n")
    latest = path.parent / "latest"
    link = path.parent / f".latest.{os.getpid()}.link.tmp"
    try:  # a new link renamed over the old one: there is always a `latest` (a kill cannot leave none)
        link.unlink(missing_ok=True)
        link.symlink_to(path.name)
        os.replace(link, latest)
    except OSError:  # no symlinks on this filesystem: the run folder is still printed
        link.unlink(missing_ok=True)
    return path


def training_args(cfg, run: Path, backend: str) -> dict:
    """The TrainingArguments both trainers share, from a stage config (TensorBoard logs go to ``<run>/tb``)."""
    from .model import precision

    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run / "tb")
    return dict(
        output_dir=str(run / "checkpoints"),
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        weight_decay=cfg.weight_decay,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        max_steps=cfg.max_steps,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        seed=cfg.seed,
        report_to=list(cfg.report_to),
        use_cpu=cfg.use_cpu,
        # Unsloth brings its own gradient checkpointing ("unsloth"), set in get_peft_model
        gradient_checkpointing=cfg.gradient_checkpointing and backend == "hf",
        **precision(cfg.use_cpu),
    )


def last_checkpoint(path: Path) -> str | None:
    """The newest complete checkpoint: the Trainer writes ``trainer_state.json`` last, so a checkpoint that a kill or
    a full disk cut short (weights but no state) is never resumed from."""
    ckpt = path / "checkpoints"
    done = [p for p in ckpt.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()
            and (p / "trainer_state.json").is_file()] if ckpt.is_dir() else []
    return str(max(done, key=lambda p: int(p.name.split("-")[-1]))) if done else None


def stop_callback():
    """A TrainerCallback: the first Ctrl-C or SIGTERM saves a checkpoint at the end of the step and stops."""
    from transformers import TrainerCallback

    class GracefulStop(TrainerCallback):
        def __init__(self):
            self.requested = False
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, self._handle)

        def _handle(self, signum, frame):
            if self.requested:  # a second signal: stop now
                raise KeyboardInterrupt
            self.requested = True
            print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step, then stopping "
                  "(again to stop at once)", file=sys.stderr)

        def on_step_end(self, args, state, control, **kwargs):
            if self.requested:
                control.should_save = True
                control.should_training_stop = True
            return control

    return GracefulStop()


def finish(path: Path, trainer, plot_keys: tuple[str, ...], plot_name: str, extra: dict | None = None) -> dict:
    """Writes metrics.json and a PNG plot of the logged keys; returns the metrics."""
    history = trainer.state.log_history
    metrics = {"global_step": trainer.state.global_step, "epoch": trainer.state.epoch,
               "log_history": history, **(extra or {})}
    for key in plot_keys:
        vals = [h[key] for h in history if key in h]
        if vals:
            metrics[f"final_{key}"] = vals[-1]
    atomic_write_text(path / "metrics.json", json.dumps(metrics, indent=2, default=str) + "\n")
    plot(history, plot_keys, path / plot_name)
    return metrics


def plot(history: list[dict], keys: tuple[str, ...], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key in keys:
        pts = [(h["step"], h[key]) for h in history if key in h and "step" in h]
        if pts:
            ax.plot(*zip(*pts), marker="o", markersize=3, label=key)
    ax.set_xlabel("step")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    from .atomic import atomic_path

    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def train_stage(stage: str, cfg, resume: bool, build, plot_keys: tuple[str, ...], plot_name: str,
                base_name: str, evaluate: bool = False) -> Path:
    """The flow both trainers share: run folder, build, train (resumable, stoppable), metrics, plot, merged model.

    ``build(cfg, run_path)`` returns ``(trainer, tokenizer, backend, extra metrics)``.
    """
    from .data import check_rows, data_hash
    from .model import resolve, save_merged

    check_rows(cfg.data, cfg.seed, cfg.val_fraction)  # bad data or a bad model path: one line, before any loading
    resolve(base_name, getattr(cfg, "gguf_file", None))
    run_path = start(cfg, stage, resume, data_hash(cfg.data))
    trainer, tokenizer, backend, extra = build(cfg, run_path)
    stopper = stop_callback()
    trainer.add_callback(stopper)
    ckpt = last_checkpoint(run_path) if resume else None
    print(f"{stage}: backend {backend}, " + ", ".join(f"{k} {v}" for k, v in extra.items())
          + f", run folder {run_path}" + (f", resuming from {ckpt}" if ckpt else ""))
    trainer.train(resume_from_checkpoint=ckpt)
    extra = {"backend": backend, **extra}
    if stopper.requested:
        finish(run_path, trainer, plot_keys, plot_name, {**extra, "interrupted": True})
        print(f"{stage}: stopped; checkpoint saved under {run_path / 'checkpoints'}; continue with --resume",
              file=sys.stderr)
        raise SystemExit(130)
    if evaluate and trainer.eval_dataset is not None:
        trainer.log(trainer.evaluate())
    finish(run_path, trainer, plot_keys, plot_name, extra)
    merged = save_merged(trainer.model, tokenizer, run_path / "merged", backend, base_name)
    print(f"{stage}: merged model written to {merged}")
    return merged


def stage_main(stage: str, doc: str, run, argv: list[str] | None = None) -> int:
    """Command line of a training stage: config flags, --resume, clean one-line errors."""
    from .config import parse_stage_args, stage_parser

    parser = stage_parser(stage, doc.split("\n\n")[0])
    parser.add_argument("--resume", action="store_true", help="continue the latest (or --run-name) run")
    cfg, args = parse_stage_args(stage, doc, argv, parser)
    from .model import ModelLoadError

    try:
        run(cfg, resume=args.resume)
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
