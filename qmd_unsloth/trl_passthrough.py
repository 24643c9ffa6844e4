"""TRL passthrough: any field of TRL's ``SFTConfig`` / ``GRPOConfig`` set under one key, ``trl``, of a stage config.

    trl: {optim: adamw_8bit, max_grad_norm: 0.5}                       # YAML (configs/sft.yaml, ...)
    QMD_UNSLOTH_SFT_TRL='{"optim": "adamw_8bit", "max_grad_norm": 0.5}'  # environment (JSON)
    --trl optim=adamw_8bit --trl max_grad_norm=0.5                      # flags (or --trl '{"max_grad_norm": 0.5}')

The sources merge key by key with the usual precedence (flags > environment > YAML).  When a stage starts, before
the run folder is made and before the model loads, every name is checked against the fields of the TRL config class
the trainer will use (TRL's own, or Unsloth's patched one on the Unsloth path), every value is converted to the
field's declared type (``"0.5"`` from a flag becomes 0.5) and TRL's dataclass builds it (its own checks run): a bad
name or value is one line naming ``trl.<key>`` and where it came from.  Keys qmd_unsloth sets itself (learning rate,
batch sizes, the GRPO knobs, ...) keep our value: a one-line warning says which of our keys to use instead.
No torch import at module level.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import sys
import typing

from .config import ConfigError

KEY = "trl"
# TRL arguments qmd_unsloth derives from one of its own keys under another name.
OUR_KEY = {"warmup_steps": "warmup_ratio", "max_length": "max_seq_length",
           "per_device_eval_batch_size": "per_device_train_batch_size",
           "reward_weights": "rules_weight / retrieval_weight", "eval_strategy": "eval_steps",
           "gradient_checkpointing": "gradient_checkpointing", "bf16": "use_cpu (bf16 where the GPU has it)",
           "fp16": "use_cpu (fp16 on GPUs without bf16)"}


class PassthroughError(ConfigError):
    """A bad ``trl.<key>``: one line naming the key and where it came from."""

    exit_code = 2


# ---------------------------------------------------------------------------------------------------- sources


def cli_keys(cli_args: list[str] | None) -> set[str]:
    """The passthrough keys given on a command line (``--trl k=v[,k=v]`` or ``--trl '{"k": v}'``, repeatable)."""
    keys: set[str] = set()
    args = list(cli_args or [])
    for i, a in enumerate(args):
        if a == f"--{KEY}" and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(f"--{KEY}="):
            value = a.split("=", 1)[1]
        else:
            continue
        if value.lstrip().startswith("{"):
            try:
                keys.update(json.loads(value))
            except ValueError:
                pass
        else:
            keys.update(p.split("=", 1)[0].strip() for p in value.split(",") if "=" in p)
    return keys


def key_sources(env_prefix: str, yaml_path, yaml_data, cli_args, overrides: dict) -> dict[str, str]:
    """Where each passthrough key came from, by the precedence the config loader applies."""
    out: dict[str, str] = {}
    from_yaml = (yaml_data or {}).get(KEY) if isinstance(yaml_data, dict) else None
    for k in from_yaml if isinstance(from_yaml, dict) else {}:
        out[str(k)] = str(yaml_path)
    env = env_prefix + KEY.upper()
    try:
        from_env = json.loads(os.environ[env]) if env in os.environ else {}
    except ValueError:
        from_env = {}
    for k in from_env if isinstance(from_env, dict) else {}:
        out[str(k)] = f"environment {env}"
    for k in cli_keys(cli_args):
        out[k] = "command line"
    for k in (overrides.get(KEY) or {}):
        out[str(k)] = "config"
    return out


# ---------------------------------------------------------------------------------------------------- building


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 240 else text[:237] + "..."


def _our_key(name: str, cfg) -> str:
    if name in OUR_KEY:
        return OUR_KEY[name]
    return name if name in type(cfg).model_fields else ""


def resolve(trl_cls, ours: dict, cfg, warn: bool = True) -> tuple[dict, dict]:
    """(the passthrough values that apply, converted to their fields' types; the ignored ones).  Raises
    PassthroughError on an unknown name or a value of the wrong type; prints one warning line per ignored key."""
    from pydantic import TypeAdapter, ValidationError

    given = dict(getattr(cfg, KEY, None) or {})
    sources = getattr(cfg, "_trl_sources", None) or {}
    fields = {f.name for f in dataclasses.fields(trl_cls) if f.init}
    hints = typing.get_type_hints(trl_cls)
    applied, ignored = {}, {}
    for key, value in given.items():
        where = sources.get(key, "config")
        if key not in fields:
            close = difflib.get_close_matches(key, sorted(fields), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise PassthroughError(f"{where}: {KEY}.{key}: not a field of {_class_name(trl_cls)}{hint}")
        try:
            value = TypeAdapter(hints[key]).validate_python(value)
        except ValidationError as e:
            err = e.errors()[0]
            raise PassthroughError(f"{where}: {KEY}.{key}: {err['msg']} (got {value!r})") from None
        if key in ours:
            ignored[key] = value
            if warn and value != ours[key] and _main_process():
                ours_key = _our_key(key, cfg)
                use = f"set {ours_key} instead" if ours_key else "qmd_unsloth fixes it"
                print(f"warning: {where}: {KEY}.{key} = {value!r} ignored: our own setting {ours[key]!r} wins ({use})",
                      file=sys.stderr)
            continue
        applied[key] = value
    return applied, ignored


def _main_process() -> bool:
    from . import dist

    return dist.is_main_process()  # every rank checks; one says so


def build(trl_cls, ours: dict, cfg, warn: bool = True):
    """(TRL's config object from our arguments plus the passthrough, the passthrough values applied; see
    ``resolve``).  A value TRL's own checks refuse is one line naming the key (found by adding the passthrough keys
    one at a time)."""
    applied, _ = resolve(trl_cls, ours, cfg, warn)
    try:
        return trl_cls(**ours, **applied), applied
    except Exception as e:
        if not applied:
            raise
        sources = getattr(cfg, "_trl_sources", None) or {}
        for key, value in applied.items():
            try:
                trl_cls(**ours, **{key: value})
            except Exception as one:
                where = sources.get(key, "config")
                raise PassthroughError(f"{where}: {KEY}.{key}: {_one_line(one)}") from None
        keys = ", ".join(f"{KEY}.{k}" for k in applied)
        raise PassthroughError(f"{keys} together: {_one_line(e)}") from None


def _class_name(trl_cls) -> str:
    from importlib.metadata import version

    name = trl_cls.__name__
    if name.startswith("Unsloth"):
        return f"{name} (Unsloth's patched TRL {version('trl')} config)"
    return f"TRL {version('trl')}'s {name}"


def record(args, applied: dict) -> dict:
    """The passthrough values as the trainer's arguments hold them (for metrics.json)."""
    out = {}
    for k in applied:
        v = getattr(args, k, None)
        out[k] = v.value if hasattr(v, "value") else v
    return out
