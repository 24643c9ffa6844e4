"""More than one process: rank, world size and the few collectives the run folder needs (torch.distributed).

The launchers (``torchrun``, ``accelerate launch``) set ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; TRL's trainers
run under them through accelerate.  What the Trainer does not cover is ours: the run folder name (the main process
decides, every rank gets it), files written once by the main process while the others wait, and a check that every
rank sees the same data.  Without a launcher every function here is a no-op for one process.  torch is imported
only inside functions, and only when a launcher started more than one process.
"""

from __future__ import annotations

import os

from .cli import UserError

_TRUE = ("1", "true", "yes", "on")


class DistributedError(UserError, RuntimeError):
    """Ranks that disagree, or a launch this backend cannot run (one line, says what to do)."""


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's device index on its own node (torchrun and accelerate launch set LOCAL_RANK)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_distributed() -> bool:
    return world_size() > 1


def is_main_process() -> bool:
    return rank() == 0


_on_cpu = False  # set by init(): accelerate runs FSDP on accelerators only and falls back to DDP on CPU


def fsdp_launch() -> bool:
    """True under ``accelerate launch`` with an FSDP config (it exports ACCELERATE_USE_FSDP), on GPUs."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() in _TRUE and not _on_cpu


def cpu_launch(use_cpu: bool = False) -> bool:
    """CPU training: the config says so, or ``accelerate launch --cpu`` (ACCELERATE_USE_CPU)."""
    return use_cpu or os.environ.get("ACCELERATE_USE_CPU", "").lower() in _TRUE


def placement() -> dict:
    """``from_pretrained`` keywords that put the model on this rank's GPU: ``device_map={"": local_rank}`` (4-bit
    bitsandbytes weights cannot be moved after loading, so each rank must load onto its own card).  Under FSDP
    none: accelerate shards the weights and places the shards itself."""
    return {} if fsdp_launch() else {"device_map": {"": local_rank()}}


def quant_storage(dtype) -> dict:
    """FSDP shards floating-point tensors only: 4-bit weights are then stored packed in the compute dtype
    (PEFT's FSDP-QLoRA guide, ``bnb_4bit_quant_storage``)."""
    return {"bnb_4bit_quant_storage": dtype} if fsdp_launch() else {}


def effective_batch(cfg) -> int:
    """Sequences per optimizer step: per device x accumulation x processes."""
    return cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world_size()


def init(use_cpu: bool = False) -> None:
    """Joins the process group before the Trainer does (accelerate's PartialState picks gloo on CPU, nccl on CUDA
    and sets this rank's GPU); the Trainer later finds it initialised and reuses it."""
    global _on_cpu
    _on_cpu = cpu_launch(use_cpu)
    if not is_distributed():
        return
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        return
    from accelerate import PartialState

    if cpu_launch(use_cpu):
        # accelerate names each CPU rank's device "cpu:0", which torch.load cannot map a checkpoint to (the Trainer
        # loads the optimizer state with map_location=args.device when world_size > 1): resume would fail.
        os.environ.setdefault("ACCELERATE_TORCH_DEVICE", "cpu")
    PartialState(cpu=cpu_launch(use_cpu))


def _active() -> bool:
    if not is_distributed():
        return False
    import torch.distributed as td

    return td.is_available() and td.is_initialized()


def barrier() -> None:
    """Every rank waits here until all have arrived (no-op for one process)."""
    if _active():
        import torch.distributed as td

        td.barrier()


def broadcast(obj):
    """The main process's ``obj`` on every rank (any picklable value)."""
    if not _active():
        return obj
    import torch.distributed as td

    box = [obj if is_main_process() else None]
    td.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not _active():
        return [obj]
    import torch.distributed as td

    out = [None] * world_size()
    td.all_gather_object(out, obj)
    return out


def agree(value, what: str):
    """Returns ``value`` when every rank holds the same one; raises DistributedError naming ``what`` otherwise."""
    values = gather(value)
    if any(v != values[0] for v in values[1:]):
        shown = ", ".join(f"rank {i}: {v}" for i, v in enumerate(values))
        raise DistributedError(f"{what} differs between processes ({shown}); put output_dir and the data on a "
                               "filesystem every node shares")
    return value


def any_rank(flag: bool, device=None) -> bool:
    """True on every rank when it is True on at least one (so that all ranks stop at the same step)."""
    if not _active():
        return flag
    import torch
    import torch.distributed as td

    t = torch.tensor([1 if flag else 0], device=device or "cpu")
    td.all_reduce(t, op=td.ReduceOp.MAX)
    return bool(t.item())


def check_backend(backend: str) -> None:
    """Refuses launches a backend does not support, in one line naming the way that works."""
    if backend == "unsloth" and is_distributed() and fsdp_launch():
        raise DistributedError("FSDP launch with the Unsloth backend: Unsloth's documented multi-GPU route is DDP "
                               "(accelerate launch / torchrun without an FSDP config); for FSDP use --backend hf")


def describe(cfg) -> dict:
    """What metrics.json and the first log line record about the launch."""
    return {"world_size": world_size(), "effective_batch_size": effective_batch(cfg),
            "parallelism": ("fsdp" if fsdp_launch() else "ddp") if is_distributed() else "single"}
