"""Run folders: one per training run, holding the resolved config, library versions, data hash, metrics and plots.

Layout: ``<output_dir>/<stage>/<run_name>/`` with ``config.yaml``, ``versions.json``, ``data.json``,
``checkpoints/``, ``tb/`` (TensorBoard), ``metrics.json``, ``loss.png`` or ``reward.png``, ``merged/``.
``<output_dir>/<stage>/latest`` points at the newest run.  Ctrl-C or SIGTERM saves a checkpoint and stops;
``--resume`` continues from the last checkpoint.

Under ``torchrun`` or ``accelerate launch`` (qmd_unsloth.dist) the main process names the run folder and writes
everything in it (config, data, metrics, plot, merged model; the Trainer writes checkpoints from the main process
too) while the other ranks wait at a barrier where a later step reads what it wrote.
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

from . import dist
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


def shared_run_dir(cfg, stage: str, resume: bool) -> Path:
    """``run_dir`` decided by the main process and given to every rank (a timestamp read on two ranks may differ)."""
    if not dist.is_distributed():
        return run_dir(cfg, stage, resume)
    decided = None
    if dist.is_main_process():
        try:
            decided = ("ok", str(run_dir(cfg, stage, resume)))
        except SystemExit as e:
            decided = ("exit", str(e))
    kind, value = dist.broadcast(decided)
    if kind == "exit":
        raise SystemExit(value)
    return Path(value)


def start(cfg: StageConfig, stage: str, resume: bool, data_hash: str | None = None, extra: dict | None = None) -> Path:
    """The run folder with config.yaml, versions.json, data.json and the ``latest`` link (written by the main
    process only; every rank returns the same path once they are there)."""
    path = shared_run_dir(cfg, stage, resume)
    if dist.is_main_process():
        _write_start(path, cfg, data_hash, extra)
    dist.barrier()
    return path


def _write_start(path: Path, cfg, data_hash: str | None, extra: dict | None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    config = dump(cfg) + "\n"
    if extra:  # how it was launched: not config keys, so recorded as a comment block the loader ignores
        config += "# launch: " + json.dumps(extra) + "\n"
    atomic_write_text(path / "config.yaml", config)
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


def prepare_data(run: Path, cfg, chat_format) -> dict:
    """``data.prepare`` into ``<run>/data`` by the main process; the other ranks wait, then read what it wrote.
    Every rank then checks that it sees the same split (a fingerprint of the prepared files)."""
    import hashlib

    from .data import prepare

    out = run / "data"
    meta = prepare(out, cfg.data, cfg.seed, cfg.val_fraction, chat_format=chat_format,
                   datasets=getattr(cfg, "hf_datasets", None)) if dist.is_main_process() else None
    dist.barrier()
    if meta is None:
        meta = json.loads((out / "prepare.json").read_text())
    h = hashlib.sha256()
    for name in ("train.jsonl", "val.jsonl"):
        h.update((out / name).read_bytes())
    meta["split_sha256"] = dist.agree(h.hexdigest(), f"{out}: the prepared train/val split")
    return meta


def record_weights(path: Path, requested: str, loaded: str) -> None:
    """Names the weights actually loaded in versions.json and atop config.yaml (a YAML comment, so the file still
    loads as a config): on the Unsloth 4-bit path a hub base may be loaded from Unsloth's pre-quantized copy."""
    versions = json.loads((path / "versions.json").read_text())
    versions["weights"] = {"requested": requested, "loaded": loaded}
    atomic_write_text(path / "versions.json", json.dumps(versions, indent=2) + "\n")
    text = "".join(l for l in (path / "config.yaml").read_text().splitlines(True) if not l.startswith("# weights"))
    note = f"# weights loaded: {loaded}" + (f" (for {requested})" if loaded != requested else "") + "\n"
    atomic_write_text(path / "config.yaml", note + text)


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
        use_cpu=dist.cpu_launch(cfg.use_cpu),
        # every LoRA weight gets a gradient each step; True breaks DDP under reentrant gradient checkpointing
        ddp_find_unused_parameters=False,
        # Unsloth brings its own gradient checkpointing ("unsloth"), set in get_peft_model; under FSDP the
        # accelerate config's fsdp_activation_checkpointing does it (both at once is an error in transformers)
        gradient_checkpointing=cfg.gradient_checkpointing and backend == "hf" and not dist.fsdp_launch(),
        **precision(dist.cpu_launch(cfg.use_cpu)),
    )


def last_checkpoint(path: Path) -> str | None:
    """The newest complete checkpoint: the Trainer writes ``trainer_state.json`` last, so a checkpoint that a kill or
    a full disk cut short (weights but no state) is never resumed from."""
    ckpt = path / "checkpoints"
    done = [p for p in ckpt.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()
            and (p / "trainer_state.json").is_file()] if ckpt.is_dir() else []
    return str(max(done, key=lambda p: int(p.name.split("-")[-1]))) if done else None


def stop_callback():
    """A TrainerCallback: the first Ctrl-C or SIGTERM saves a checkpoint at the end of the step and stops.

    Under torchrun or accelerate launch (whose workers run in their own sessions: a terminal's Ctrl-C reaches the
    launcher, which forwards it to each worker) the ranks agree at every step end (one all-reduce of a flag), so
    that all stop after the same step; torchrun gives its workers 30 s after forwarding a signal before it kills
    them."""
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
            self.requested = dist.any_rank(self.requested, args.device)
            if self.requested:
                control.should_save = True
                control.should_training_stop = True
            return control

    return GracefulStop()


def finish(path: Path, trainer, plot_keys: tuple[str, ...], plot_name: str, extra: dict | None = None) -> dict:
    """Writes metrics.json and a PNG plot of the logged keys (main process only); returns the metrics."""
    history = trainer.state.log_history
    metrics = {"global_step": trainer.state.global_step, "epoch": trainer.state.epoch,
               "log_history": history, **(extra or {})}
    for key in plot_keys:
        vals = [h[key] for h in history if key in h]
        if vals:
            metrics[f"final_{key}"] = vals[-1]
    if dist.is_main_process():
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
                base_name: str, evaluate: bool = False, check=None) -> Path:
    """The flow both trainers share: run folder, build, train (resumable, stoppable), metrics, plot, merged model.

    ``build(cfg, run_path)`` returns ``(trainer, tokenizer, backend, extra metrics)``; ``check(cfg)``, when given,
    runs before the run folder is made (the TRL passthrough's checks).
    """
    from transformers import set_seed

    from .data import check_rows, data_hash
    from .model import resolve, weights_repo

    datasets = getattr(cfg, "hf_datasets", None)
    check_rows(cfg.data, cfg.seed, cfg.val_fraction, datasets)  # bad data or model path: one line, before any loading
    resolve(base_name, getattr(cfg, "gguf_file", None))
    dist.init(cfg.use_cpu)
    if check is not None:
        check(cfg)
    launch = dist.describe(cfg)
    run_path = start(cfg, stage, resume, data_hash(cfg.data, datasets), launch)
    set_seed(cfg.seed)  # the LoRA's initial weights too: the same on one process or many (DDP copies rank 0's)
    trainer, tokenizer, backend, extra = build(cfg, run_path)
    dist.check_backend(backend)
    if dist.is_main_process():
        record_weights(run_path, base_name, weights_repo(base_name, cfg, backend))
    stopper = stop_callback()
    trainer.add_callback(stopper)
    ckpt = dist.agree(last_checkpoint(run_path) if resume else None, "the checkpoint to resume from")
    extra = {**extra, **launch}
    say(f"{stage}: backend {backend}, " + ", ".join(f"{k} {v}" for k, v in extra.items())
        + f" ({cfg.per_device_train_batch_size} per device x {cfg.gradient_accumulation_steps} accumulation x "
        f"{launch['world_size']} processes), run folder {run_path}" + (f", resuming from {ckpt}" if ckpt else ""))
    trainer.train(resume_from_checkpoint=ckpt)
    extra = {"backend": backend, **extra}
    if stopper.requested:
        finish(run_path, trainer, plot_keys, plot_name, {**extra, "interrupted": True})
        dist.barrier()
        if dist.is_main_process():
            print(f"{stage}: stopped; checkpoint saved under {run_path / 'checkpoints'}; continue with --resume",
                  file=sys.stderr)
        raise SystemExit(130)
    if evaluate and trainer.eval_dataset is not None:
        trainer.log(trainer.evaluate())
    finish(run_path, trainer, plot_keys, plot_name, extra)
    merged = merge(trainer, tokenizer, run_path / "merged", backend, base_name)
    say(f"{stage}: merged model written to {merged}")
    return merged


def say(line: str) -> None:
    """A progress line, printed once (by the main process)."""
    if dist.is_main_process():
        print(line, flush=True)


def merge(trainer, tokenizer, out: Path, backend: str, base_name: str) -> Path:
    """The merged 16-bit model, written by the main process while the others wait.

    Under FSDP no rank holds whole weights: the Trainer gathers the adapter (every rank takes part), then the main
    process merges it into a 16-bit copy of the base."""
    from .model import save_merged

    if dist.is_distributed() and dist.fsdp_launch():
        adapter = out.with_name(f".{out.name}.adapter")
        trainer.save_model(str(adapter))
        if dist.is_main_process():
            merge_adapter(adapter, tokenizer, out, base_name)
    elif dist.is_main_process():
        save_merged(trainer.model, tokenizer, out, backend, base_name)
    dist.barrier()
    return out


def merge_adapter(adapter: Path, tokenizer, out: Path, base_name: str) -> None:
    """A saved LoRA adapter merged into a 16-bit copy of its base, written atomically to ``out``."""
    import shutil

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from .atomic import atomic_folder
    from .model import resolve

    path, _ = resolve(base_name)
    with atomic_folder(out) as tmp:
        base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
        PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(adapter, ignore_errors=True)


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
