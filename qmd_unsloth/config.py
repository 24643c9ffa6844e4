"""Stage configs: pydantic-settings models read from YAML, overridden by environment variables, then by flags.

Precedence (highest first): command-line flags (``--lora-r 8``), environment variables
(``QMD_UNSLOTH_SFT_LORA_R=8``), the YAML file (``--config configs/sft.yaml``), the defaults below.  An unknown key
or a bad value is a one-line error naming the key; ``--dry-run`` prints the resolved config and exits.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, CliSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings import YamlConfigSettingsSource
from .cli import UsageError
from .hf_data import HFDataset
from .qmd_contract import MAX_TOKENS as QMD_MAX_TOKENS
from .qmd_contract import SAMPLING as QMD_SAMPLING

REPO_ROOT = Path(__file__).resolve().parent.parent
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ConfigError(UsageError, ValueError):
    """A bad config file, environment variable or flag (one line, names the key)."""


class StageConfig(BaseSettings):
    """Shared machinery; each stage below sets its env prefix."""

    model_config = SettingsConfigDict(extra="forbid", validate_default=True, cli_kebab_case=True,
                                      cli_implicit_flags=True)

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if settings_cls.model_config.get("yaml_file"):
            sources.append(YamlConfigSettingsSource(settings_cls))
        return tuple(sources)


class RetrievalSource(BaseModel):
    """One collection for the retrieval reward."""

    model_config = ConfigDict(extra="forbid")
    collection: Path
    qrels: Path | None = None


class TrainCommon(StageConfig):
    backend: Literal["auto", "unsloth", "hf"] = Field(
        "auto", description="auto: Unsloth when CUDA and unsloth are there, else transformers + peft")
    output_dir: Path = Field(Path("runs"), description="run folders are created under this folder")
    run_name: str | None = Field(None, description="run folder name (default: stage-timestamp)")
    seed: int = 42
    max_seq_length: int = Field(512, gt=16)
    load_in_4bit: bool = Field(True, description="4-bit base weights where CUDA is present (ignored on CPU)")
    lora_r: int = Field(16, gt=0)
    lora_alpha: int = Field(32, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: list(ALL_PROJECTIONS))
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    per_device_train_batch_size: int = Field(4, gt=0)
    gradient_accumulation_steps: int = Field(4, gt=0)
    max_steps: int = Field(-1, description="stop after this many optimizer steps (-1: use epochs)")
    logging_steps: int = Field(10, gt=0)
    save_steps: int = Field(100, gt=0)
    save_total_limit: int = Field(3, gt=0)
    gradient_checkpointing: bool = True
    report_to: list[str] = Field(default_factory=lambda: ["tensorboard"])
    use_cpu: bool = Field(False, description="force CPU even when CUDA is present")
    prequantized_4bit: bool = Field(
        True, description="Unsloth 4-bit on CUDA: load Unsloth's pre-quantized copy of a hub base (e.g. "
        "unsloth/Qwen3-1.7B-unsloth-bnb-4bit for Qwen/Qwen3-1.7B: smaller download, less load-time memory); the "
        "run folder records the repo loaded. false: the named repo, quantized at load")
    trl: dict[str, Any] = Field(
        default_factory=dict, description="TRL passthrough: any other field of TRL's SFTConfig/GRPOConfig (YAML "
        "mapping; env JSON; flags --trl key=value, repeatable), checked against the installed TRL when the stage "
        "starts; our own keys win where they overlap (docs/training.md)")
    _trl_sources: dict = PrivateAttr(default_factory=dict)  # where each trl key came from (for one-line errors)

    @model_validator(mode="after")
    def _no_embeddings(self):
        bad = [m for m in self.target_modules if m in ("embed_tokens", "lm_head")]
        if bad:
            raise ValueError(f"target_modules: {bad[0]} must not be trained (Qwen3 ties it to the embeddings)")
        return self


class SFTConfig(TrainCommon):
    """Supervised fine-tuning: LoRA r16 on all seven projections, loss on the answer only."""

    model_config = SettingsConfigDict(env_prefix="QMD_UNSLOTH_SFT_")
    base_model: str = Field("Qwen/Qwen3-1.7B", description="hub id, local folder, or local .gguf file")
    gguf_file: str | None = Field(None, description="file name inside base_model when it is a folder of GGUFs")
    data: list[Path] = Field(default_factory=lambda: [REPO_ROOT / "data"], description="JSONL files or folders")
    hf_datasets: list[HFDataset] = Field(default_factory=list, description="Hugging Face datasets used beside data "
                                         "(hub id, save_to_disk folder, parquet/JSONL files) with a column mapping: "
                                         "docs/data.md; data: [] for the datasets alone")
    val_fraction: float = Field(0.05, ge=0, lt=1)
    num_train_epochs: float = Field(5, gt=0)
    eval_steps: int = Field(50, gt=0)
    packing: bool = Field(False, description="pack short examples into full sequences (padding-free)")


class GRPOConfig(TrainCommon):
    """GRPO on the merged SFT model with a new small LoRA, rewarded by qmd_unsloth.reward."""

    model_config = SettingsConfigDict(env_prefix="QMD_UNSLOTH_GRPO_")
    sft_model: str = Field("runs/sft/latest/merged", description="the merged SFT model (folder or hub id)")
    data: list[Path] = Field(default_factory=lambda: [REPO_ROOT / "data"])
    hf_datasets: list[HFDataset] = Field(default_factory=list, description="Hugging Face datasets used beside data "
                                         "(docs/data.md)")
    val_fraction: float = Field(0.05, ge=0, lt=1)
    lora_r: int = Field(4, gt=0)
    lora_alpha: int = Field(8, gt=0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    # Measured (scripts/grpo_experiments.py proof): at 5e-6 x 200 steps' worth of Adam movement a rank-4 LoRA on q,v
    # did not move the policy (KL 4e-6, eval reward +0.001); 8x that moved it (KL 2e-4) and raised the eval reward.
    learning_rate: float = Field(2e-5, gt=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    beta: float = Field(0.04, gt=0, description="KL weight; must stay > 0 (beta=0 drifts off the format)")
    # Batch (TRL 1.14 GRPOConfig): per_device_train_batch_size counts COMPLETIONS; one generation batch of
    # per_device x accumulation x processes completions is sampled per optimizer step (steps_per_generation defaults
    # to gradient_accumulation_steps), i.e. that / num_generations distinct prompts.  8 x 4 / 8 = 4 prompts per step
    # (one prompt per step gave a gradient from one group only), and groups of 8 rather than 4: at QMD's temperature
    # an SFT model often writes 4 expansions of equal reward, a group with no variance and so no advantage.  8
    # completions of <= 200 tokens per micro-batch fit a 12 GB card with Qwen3-1.7B in 4 bits (the 12 GB preset
    # halves the micro-batch and doubles the accumulation).
    num_generations: int = Field(8, ge=2, description="completions per prompt (the group GRPO compares)")
    max_steps: int = 200
    max_completion_length: int = Field(200, gt=0)
    per_device_train_batch_size: int = Field(8, gt=0, description="completions per micro-batch")
    gradient_accumulation_steps: int = Field(4, gt=0, description="micro-batches per optimizer step (and per "
                                             "generation batch)")
    # Sampling as QMD samples when it serves the GGUF (qmd_contract.SAMPLING): the policy is optimised for the
    # distribution it is served at.  QMD's presence penalty (0.5) has no TRL counterpart (transformers' generate has
    # none; vLLM's would make the two backends differ), so it is left out; repetition penalty is off as in QMD.
    temperature: float = Field(QMD_SAMPLING["temperature"], gt=0, description="sampling temperature (QMD: 0.7)")
    top_k: int = Field(QMD_SAMPLING["top_k"], ge=0, description="top-k sampling (QMD: 20; 0: off)")
    top_p: float = Field(QMD_SAMPLING["top_p"], gt=0, le=1, description="nucleus sampling (QMD: 0.8)")
    min_p: float = Field(QMD_SAMPLING["min_p"], ge=0, le=1, description="min-p sampling (QMD: none, 0: off)")
    repetition_penalty: float = Field(QMD_SAMPLING["repeat_penalty"], gt=0, description="(QMD: off, 1.0)")
    use_vllm: Literal["auto", "on", "off"] = Field("auto", description="fast generation through vLLM when installed")
    save_steps: int = Field(50, gt=0)
    # Prompts and rewards.  The rule reward (qmd_unsloth.reward) always runs; the retrieval reward
    # (qmd_unsloth.retrieval_reward) joins it when retrieval_weight > 0.  TRL sums them with these weights.
    prompts: Path | None = Field(None, description="queries file (one a line, # comments) used as prompts "
                                 "instead of the data's queries")
    rules_weight: float = Field(1.0, ge=0, description="weight of the rule reward")
    retrieval_weight: float = Field(0.0, ge=0, description="weight of the retrieval reward (0: off)")
    retrieval_collection: Path | None = Field(None, description="collection for the retrieval reward (TREC XML, "
                                              "BEIR folder)")
    retrieval_qrels: Path | None = Field(None, description="judgments file when the collection has none of its own")
    retrieval_mode: Literal["hybrid", "bm25", "dense"] = Field(
        "hybrid", description="hybrid (BM25 + MiniLM, as bench retrieval), or bm25 only (fast)")
    retrieval_more: list[RetrievalSource] = Field(
        default_factory=list, description="more collections for the retrieval reward, as {collection, qrels} "
        "mappings: each prompt is scored on the first collection that judges its query")
    retrieval_clip: float = Field(1.0, gt=0, le=1, description="the retrieval reward (nDCG@10 gain over the raw "
                                  "query, in [-1, 1]) is clipped to [-c, c], so one query's swing cannot dominate")

    @model_validator(mode="after")
    def _retrieval_needs_a_collection(self):
        if self.retrieval_weight > 0 and self.retrieval_collection is None:
            raise ValueError("retrieval_weight: > 0 needs retrieval_collection (a TREC, BEIR or notes collection)")
        if self.rules_weight == 0 and self.retrieval_weight == 0:
            raise ValueError("rules_weight: at least one of rules_weight and retrieval_weight must be > 0")
        return self

    # Set explicitly, so that GRPO means the same on both backends: Unsloth's patched GRPOConfig replaces TRL's
    # defaults (loss_type, beta, vLLM importance-sampling correction, mask_truncated_completions; unsloth/models/rl.py).
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = Field(
        "dapo", description="GRPO loss normalisation (TRL 1.x's default dapo; Unsloth alone would pick it too, "
        "then change other knobs: all are set here)")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="divide advantages by the reward std of the group, the batch, or not at all (Dr. GRPO)")
    importance_sampling_level: Literal["token", "sequence"] = Field(
        "token", description="token: GRPO; sequence: GSPO")
    mask_truncated_completions: bool = Field(
        False, description="leave completions cut at max_completion_length out of the loss (DAPO)")
    epsilon_high: float = Field(
        0.2, gt=0, description="upper clipping bound (TRL's lower bound epsilon is 0.2; DAPO uses 0.28). Never left "
        "empty: Unsloth would set 0.28 for loss_type dapo")
    vllm_importance_sampling_correction: bool = Field(
        True, description="with vLLM: correct for vLLM vs training-model sampling mismatch (TRL's default; "
        "Unsloth turns it off unless set)")
    vllm_standby: bool = Field(
        False, description="Unsloth vLLM standby (UNSLOTH_VLLM_STANDBY=1, set before unsloth is imported): shares "
        "memory between vLLM and training on 12-16 GB cards; it OVERRIDES gpu_memory_utilization")
    gpu_memory_utilization: float = Field(
        0.5, gt=0, le=1, description="fraction of GPU memory vLLM may take (ignored when vllm_standby is on)")

    @model_validator(mode="after")
    def _dr_grpo_unscaled(self):
        if self.loss_type == "dr_grpo" and self.scale_rewards != "none":
            raise ValueError("scale_rewards: loss_type dr_grpo needs scale_rewards: none (Unsloth would switch it "
                             "to none on its own, and the backends would then differ)")
        return self

    @model_validator(mode="after")
    def _batch_divisible(self):
        batch = self.per_device_train_batch_size * self.gradient_accumulation_steps
        if batch % self.num_generations:
            raise ValueError(f"per_device_train_batch_size: batch x accumulation ({batch}) must be divisible by "
                             f"num_generations ({self.num_generations})")
        return self


class ExportConfig(StageConfig):
    """GGUF export through llama.cpp's converter and quantizer (Unsloth's save_pretrained_gguf on its path)."""

    model_config = SettingsConfigDict(env_prefix="QMD_UNSLOTH_EXPORT_")
    model: Path | None = Field(None, description="run folder, merged model or adapter")
    out: Path = Path("runs/gguf")
    quant: str = "q4_k_m"
    also: list[str] = Field(default_factory=list, description="extra quantizations, e.g. q8_0")
    name: str = Field("qmd-query-expansion", description="file names are <name>-<quant>.gguf")
    llama_cpp_dir: Path = Field(default_factory=lambda: _default_tools_dir(),
                                description="llama.cpp tools folder (default: $QMD_UNSLOTH_CACHE/llama.cpp)")
    backend: Literal["auto", "unsloth", "llama.cpp"] = Field(
        "auto", description="unsloth: Unsloth's save_pretrained_gguf (auto when CUDA and unsloth are there; runs on "
        "its CPU backend too); llama.cpp: llama.cpp's converter and quantizer directly")
    allow_llama_cpp_install: bool = Field(False, description="let Unsloth install llama.cpp itself (needs network)")
    reload: str | None = Field(None, description="after export, hot-swap the new GGUF into the server at this URL")
    install_qmd: bool = Field(False, description="after export, install the GGUF into QMD (python -m "
                              "qmd_unsloth.qmd_install)")


def _default_tools_dir() -> Path:
    from .llamacpp import default_dir

    return default_dir()


class EvalConfig(StageConfig):
    """Reward scores of a model's expansions, sampled like QMD serves them."""

    model_config = SettingsConfigDict(env_prefix="QMD_UNSLOTH_EVAL_")
    model: str | None = Field(None, description="HF model folder or .gguf file")
    engine: Literal["llama.cpp", "qmd"] = Field(
        "llama.cpp", description="llama.cpp: llama-cpp-python with QMD's prompt, grammar and sampling; qmd: the real "
        "QMD's own expansion (python -m qmd_unsloth.qmd_real install), .gguf only")
    threads: int | None = Field(None, gt=0, description="engine qmd: CPU threads per node-llama-cpp context "
                                "(default: node-llama-cpp's own, max(4, cores))")
    queries: Path = REPO_ROOT / "data" / "eval_queries.txt"
    out: Path = Path("runs/eval")
    samples: int = Field(1, gt=0)
    greedy: bool = False
    temperature: float = Field(QMD_SAMPLING["temperature"], ge=0)
    top_k: int = Field(QMD_SAMPLING["top_k"], ge=0)
    top_p: float = Field(QMD_SAMPLING["top_p"], gt=0, le=1)
    min_p: float = Field(QMD_SAMPLING["min_p"], ge=0, le=1)
    presence_penalty: float = Field(QMD_SAMPLING["presence_penalty"], description="0, as QMD: the 0.5 it asks "
                                    "node-llama-cpp for has no effect (qmd_contract)")
    max_new_tokens: int = Field(QMD_MAX_TOKENS, gt=0, description="QMD's cap: 600")
    min_score: float = Field(0.0, ge=0, le=1, description="exit 1 when the mean score is below this")
    compare: str | None = Field(None, description="a second model scored side by side")
    seed: int = 0


class ServeConfig(StageConfig):
    """The local model server (python -m qmd_unsloth.serve)."""

    model_config = SettingsConfigDict(env_prefix="QMD_UNSLOTH_SERVE_")
    model: Path | None = Field(None, description="the GGUF to serve")
    host: str = Field("127.0.0.1", description="address to bind; anything but loopback needs a token")
    port: int = Field(8765, ge=0, le=65535, description="0 picks a free port")
    token: SecretStr | None = Field(None, description="bearer token for admin calls and for non-loopback or proxied "
                                    "clients (prefer the env variable QMD_UNSLOTH_SERVE_TOKEN: flags show in ps)")
    max_tokens: int = Field(600, gt=0, description="default token cap of /expand and chat completions (QMD: 600)")
    n_ctx: int = Field(2048, gt=64, description="context size (QMD: 2048; capped at the model's own)")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"


class GenerateConfig(StageConfig):
    """Training rows from a teacher model behind an OpenAI-compatible endpoint (the key is never a config key)."""

    model_config = SettingsConfigDict(env_prefix="QMD_UNSLOTH_GENERATE_")
    base_url: str | None = Field(None, description="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8080/v1")
    model: str | None = Field(None, description="the teacher model's name at that endpoint")
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable holding the API key (if any)")
    count: int | None = Field(None, gt=0, description="rows wanted in --out in all (default: one per --queries query)")
    out: Path = Field(Path("runs/generate/generated.jsonl"), description="JSONL rows, appended; a re-run resumes")
    queries: Path | None = Field(None, description="queries to expand first (one a line, '# category: NAME' groups)")
    topics: Path | None = Field(None, description="topics for new queries, 'name: description' a line (default: "
                                                  "the categories of data/README.md)")
    min_score: float = Field(0.8, ge=0, le=1, description="keep rows the reward scores at least this high")
    concurrency: int = Field(4, gt=0, description="requests in flight at once")
    max_requests: int | None = Field(None, gt=0, description="stop after this many HTTP requests, every retry and "
                                                           "the start-up check included (default: no limit)")
    timeout: float = Field(60.0, gt=0, description="seconds per request")
    max_retries: int = Field(3, ge=0, description="retries of a failed request (429, 5xx, timeouts, bad bodies); "
                                                 "each retry is an HTTP request and counts against --max-requests")
    temperature: float = Field(0.7, ge=0, description="sampling temperature of expansions")
    query_temperature: float = Field(1.0, ge=0, description="sampling temperature of query generation")
    max_tokens: int = Field(400, gt=0, description="token cap per answer")
    queries_per_request: int = Field(8, gt=0, description="new queries asked for in one request")
    max_failures_in_a_row: int = Field(20, gt=0, description="stop when this many requests fail in a row")
    data: Path = Field(REPO_ROOT / "data", description="existing rows (*.jsonl) that new queries must not duplicate")
    eval_queries: Path = Field(REPO_ROOT / "data" / "eval_queries.txt",
                               description="held-out queries: no near-duplicate of them is generated")
    seed: int = 0


STAGES: dict[str, type[StageConfig]] = {"sft": SFTConfig, "grpo": GRPOConfig, "export": ExportConfig,
                                        "eval": EvalConfig, "serve": ServeConfig, "generate": GenerateConfig}


def _one_line(err: ValidationError, cls: type[StageConfig], yaml_path, cli_args) -> str:
    e = err.errors()[0]
    msg = e["msg"].removeprefix("Value error, ")
    key = ".".join(str(p) for p in e["loc"][:1]) or msg.split(":", 1)[0]
    env = cls.model_config.get("env_prefix", "") + key.upper()
    if cli_args and any(a.split("=", 1)[0] in (f"--{key}", f"--{key.replace('_', '-')}") for a in cli_args):
        source = "command line"
    elif env in os.environ:
        source = f"environment {env}"
    else:
        source = str(yaml_path) if yaml_path else "config"
    if e["type"] == "extra_forbidden":
        return f"{source}: unknown key '{key}'"
    value = e.get("input")
    shown = f" (got {value!r})" if e["loc"] and not isinstance(value, dict) and value is not None else ""
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: {msg if not e['loc'] else f'{key}: {msg}'}{shown}{more}"


def load(cls: type[StageConfig], yaml_path: str | Path | None = None, cli_args: list[str] | None = None,
         **overrides) -> StageConfig:
    """Builds a stage config from YAML, environment and flags; raises ConfigError with one line."""
    if yaml_path is not None:
        yaml_path = Path(yaml_path)
        if not yaml_path.is_file():
            raise ConfigError(f"{yaml_path}: config file not found")
        try:
            import yaml

            data = yaml.safe_load(yaml_path.read_text())
        except Exception as e:  # a YAML syntax error: report the file and the parser's one-line reason
            raise ConfigError(f"{yaml_path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"{yaml_path}: must hold a mapping of keys to values")
    else:
        data = None
    bound = type(cls.__name__, (cls,), {"model_config": {**cls.model_config, "yaml_file": yaml_path}})
    try:
        if cli_args is not None:
            parser = _ErrorParser(prog=cls.__name__, add_help=False)
            cli = CliSettingsSource(bound, root_parser=parser, cli_parse_args=cli_args, cli_exit_on_error=False)
            cfg = bound(_cli_settings_source=cli(args=cli_args), **overrides)
        else:
            cfg = bound(**overrides)
    except ValidationError as e:
        raise ConfigError(_one_line(e, cls, yaml_path, cli_args)) from None
    except ConfigError:
        raise
    except Exception as e:  # CLI parse errors from pydantic-settings, or an environment value that is not JSON
        first = str(e).splitlines()[0]
        if "from source \"EnvSettingsSource\"" in first and '"' in first:
            env = cls.model_config.get("env_prefix", "") + first.split('"')[1].upper()
            raise ConfigError(f"environment {env}: not valid JSON (a list or mapping must be written as JSON, e.g. "
                              f"{env}='{{\"key\": 1}}')") from None
        raise ConfigError(f"command line: {first}") from None
    if "trl" in type(cfg).model_fields:
        from .trl_passthrough import key_sources

        cfg._trl_sources = key_sources(cls.model_config.get("env_prefix", ""), yaml_path, data, cli_args, overrides)
    return cfg


class _ErrorParser(argparse.ArgumentParser):
    def error(self, message):
        raise ConfigError(f"command line: {message}")


def stage_parser(stage: str, description: str) -> argparse.ArgumentParser:
    """The flags every stage takes besides its config keys."""
    p = argparse.ArgumentParser(prog=f"python -m qmd_unsloth.{stage}", description=description, add_help=False)
    p.add_argument("--config", help=f"YAML file (e.g. configs/{stage}.yaml)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("-h", "--help", action="store_true", help="show this help and the config keys")
    return p


def parse_stage_args(stage: str, description: str, argv: list[str] | None = None,
                     extra: argparse.ArgumentParser | None = None):
    """Parses a stage's command line: returns (config, known args).  Prints and exits 2 on a bad config."""
    parser = extra or stage_parser(stage, description)
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    cls = STAGES[stage]
    if args.help:
        parser.print_help()
        print("\nconfig keys (flags as --key-name VALUE, env as " + cls.model_config["env_prefix"] + "KEY_NAME):")
        for name, f in cls.model_fields.items():
            default = f.default_factory() if f.default_factory else f.default
            desc = f" - {f.description}" if f.description else ""
            print(f"  --{name.replace('_', '-'):<30} {default!s:<24}{desc}")
        raise SystemExit(0)
    try:
        cfg = load(cls, args.config, rest)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.dry_run:
        print(dump(cfg))
        raise SystemExit(0)
    return cfg, args


def dump(cfg: StageConfig) -> str:
    """The resolved config as YAML (what --dry-run prints and every run folder records)."""
    import yaml

    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).rstrip()
