"""Two backends behind one interface: Unsloth (4-bit, fast kernels) when CUDA is there, transformers + peft otherwise.

``load_for_training(name, cfg)`` returns ``(model with a fresh LoRA, tokenizer, backend)``; ``save_merged`` writes a
16-bit merged model (Unsloth's ``save_pretrained_merged`` on its path).  Everything CPU-specific lives here.
"""

from __future__ import annotations

import os
import struct
import sys
from importlib.util import find_spec
from pathlib import Path

from .cli import UserError
from .llamacpp import default_dir as default_tools_dir

# Unsloth reads these when it is imported (unsloth_zoo/llama_cpp.py: LLAMA_CPP_DEFAULT_DIR is a module-level default,
# bound into function defaults), so they are set here, before any unsloth import: never let it apt-get, git clone or
# download llama.cpp on its own, and point it at the pinned tools folder.
os.environ.setdefault("UNSLOTH_LLAMA_CPP_OFFLINE", "1")
os.environ.setdefault("UNSLOTH_AUTO_INSTALL", "0")
os.environ.setdefault("UNSLOTH_LLAMA_CPP_PATH", str(default_tools_dir()))
# Unsloth must come before these (unsloth/_gpu_init.py warns that training may be slower or use more memory).
PATCHED_BY_UNSLOTH = ("transformers", "trl", "peft")


class ModelLoadError(UserError, RuntimeError):
    """A model that cannot be loaded (one line, says why and what to do)."""


class UnslothToolsMismatch(UserError, RuntimeError):
    """unsloth was imported pointing at another llama.cpp folder than the export's (one line)."""


def import_unsloth(tools: str | os.PathLike | None = None, vllm_standby: bool | None = None):
    """The one place qmd_unsloth imports unsloth: sets its environment first, then imports it before transformers,
    trl and peft.  Returns the ``unsloth`` module.

    ``tools``: the llama.cpp folder GGUF export will use.  Unsloth reads ``UNSLOTH_LLAMA_CPP_PATH`` once, when
    unsloth_zoo.llama_cpp is first imported, so when that already happened with another folder this raises
    UnslothToolsMismatch instead of letting the export use (or install into) the wrong one.
    ``vllm_standby``: sets ``UNSLOTH_VLLM_STANDBY`` (read by unsloth_zoo/vllm_utils.py at load time, and by
    unsloth's patched GRPO trainer) when unsloth has not been imported yet.
    """
    fresh = "unsloth" not in sys.modules
    if tools is not None and "unsloth_zoo.llama_cpp" not in sys.modules:
        os.environ["UNSLOTH_LLAMA_CPP_PATH"] = str(tools)
    if vllm_standby is not None:
        if fresh:
            os.environ["UNSLOTH_VLLM_STANDBY"] = "1" if vllm_standby else "0"
        elif (os.environ.get("UNSLOTH_VLLM_STANDBY", "0") != "0") != vllm_standby:
            raise ModelLoadError(f"vllm_standby: {vllm_standby} asked for, but unsloth was already imported with "
                                 "UNSLOTH_VLLM_STANDBY set otherwise; set it before starting Python")
    if fresh:
        late = [m for m in PATCHED_BY_UNSLOTH if m in sys.modules]
        if late:  # a bug in our import order, not a user mistake: say so loudly (the GPU path would run unpatched)
            import warnings

            warnings.warn(f"qmd_unsloth: {', '.join(late)} imported before unsloth", stacklevel=2)
    import unsloth

    if tools is not None:
        import unsloth_zoo.llama_cpp as zoo_llama_cpp

        used = Path(zoo_llama_cpp.LLAMA_CPP_DEFAULT_DIR).expanduser().resolve()
        if used != Path(tools).expanduser().resolve():
            raise UnslothToolsMismatch(
                f"unsloth was imported with UNSLOTH_LLAMA_CPP_PATH={zoo_llama_cpp.LLAMA_CPP_DEFAULT_DIR}, not the "
                f"llama.cpp tools folder {tools}; set UNSLOTH_LLAMA_CPP_PATH={tools} before starting Python (or "
                "pass that folder as --llama-cpp-dir)")
    return unsloth


def weights_repo(name: str, cfg, backend: str) -> str:
    """The repo or folder whose weights are actually loaded for ``name``.

    On the Unsloth backend with 4-bit loading on CUDA, a hub id such as ``Qwen/Qwen3-1.7B`` is loaded from Unsloth's
    pre-quantized copy (``unsloth/Qwen3-1.7B-unsloth-bnb-4bit``: a ~1.4 GB download instead of 3.4 GB, and no
    16-bit copy in memory while quantizing, which matters on a 12 GB card) when ``prequantized_4bit`` is true (the
    default); the name comes from Unsloth's own mapper (unsloth/models/loader_utils.py get_model_name, tables in
    unsloth/models/mapper.py).  Otherwise, and for local folders, ``name`` itself.  The loader is then called with
    ``use_exact_model_name=True`` so that what the run records is what it loads.
    """
    path, gguf = resolve(name, getattr(cfg, "gguf_file", None))
    if (backend != "unsloth" or gguf or Path(path).exists() or not cfg.load_in_4bit
            or not getattr(cfg, "prequantized_4bit", True) or getattr(cfg, "use_cpu", False) or not cuda_available()):
        return path
    import_unsloth()
    from unsloth.models.loader_utils import get_model_name

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    return get_model_name(path, load_in_4bit=True, local_files_only=offline)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def choose_backend(requested: str = "auto", use_cpu: bool = False) -> str:
    """'unsloth' when asked for or when CUDA and unsloth are both there; 'hf' otherwise."""
    have_unsloth = find_spec("unsloth") is not None
    if requested == "unsloth":
        if not have_unsloth:
            raise ModelLoadError("backend 'unsloth' asked for but unsloth is not installed: pip install '.[gpu]'")
        return "unsloth"
    if requested == "hf":
        return "hf"
    return "unsloth" if have_unsloth and not use_cpu and cuda_available() else "hf"


def precision(use_cpu: bool = False) -> dict:
    """TrainingArguments precision flags: bf16 where the GPU supports it, fp16 on older GPUs (T4), fp32 on CPU."""
    import torch

    if use_cpu or not torch.cuda.is_available():
        return {"bf16": False, "fp16": False}
    bf16 = torch.cuda.is_bf16_supported()
    return {"bf16": bf16, "fp16": not bf16}


def compute_dtype(use_cpu: bool = False):
    import torch

    p = precision(use_cpu)
    return torch.bfloat16 if p["bf16"] else torch.float16 if p["fp16"] else torch.float32


def resolve(name: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """(folder or hub id, gguf file name or None).  A path to a .gguf file is split into its folder and name."""
    p = Path(name).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelLoadError(f"{name}: GGUF file not found")
        with open(p, "rb") as fh:
            if fh.read(4) != b"GGUF":
                raise ModelLoadError(f"{name}: not a GGUF file (it does not start with the GGUF magic bytes)")
        return str(p.parent), p.name
    if p.exists():
        if not p.is_dir():
            raise ModelLoadError(f"{name}: not a model folder or .gguf file")
        if gguf_file is None and not (p / "config.json").is_file():
            ggufs = sorted(f.name for f in p.glob("*.gguf"))
            hint = f" (it holds {ggufs[0]}: pass that file)" if ggufs else ""
            raise ModelLoadError(f"{name}: no config.json in this folder; pass a HF model folder, a .gguf file or a "
                                 f"hub id{hint}")
        return str(p), gguf_file
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelLoadError(f"{name}: no such local model folder (and not a hub id like Qwen/Qwen3-1.7B)")
    return name, gguf_file


def _offline_error(name: str, err: Exception, loaded: str | None = None) -> ModelLoadError:
    """``loaded``: the repo actually asked for when it differs from ``name`` (see weights_repo)."""
    if Path(name).expanduser().exists():  # a local folder or file that is there but broken: say what is wrong
        why = " ".join(str(err).split())[:200] or type(err).__name__
        return ModelLoadError(f"{name}: cannot load this model ({why})")
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    why = "HF_HUB_OFFLINE=1 is set" if offline else "the hub could not be reached"
    repo = loaded or name
    which = f"{name} (loaded as {repo}, Unsloth's pre-quantized 4-bit copy)" if repo != name else name
    return ModelLoadError(f"{which}: weights are not in the local Hugging Face cache and {why}; download them first "
                          f"(hf download {repo}) or pass a local folder or .gguf file ({type(err).__name__})")


def _bad_gguf(name: str, err: Exception) -> ModelLoadError:
    why = " ".join(str(err).split())[:160] or type(err).__name__
    return ModelLoadError(f"{name}: cannot read this GGUF file (truncated or corrupt: {why}); copy or export it again")


def load_tokenizer(name: str, gguf_file: str | None = None):
    """A tokenizer through transformers (on the Unsloth path, call import_unsloth() before this)."""
    from transformers import AutoTokenizer

    path, gguf = resolve(name, gguf_file)
    try:
        tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf) if gguf else AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise _offline_error(name, e) from None
    except (ValueError, struct.error) as e:
        if not gguf:
            raise
        raise _bad_gguf(name, e) from e
    if gguf:
        _repair_byte_level_bpe(tok)
    _chatml_end_of_turn(tok)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _repair_byte_level_bpe(tok) -> bool:
    """A byte-level BPE that transformers' GGUF loader marked byte_fallback (qmd_unsloth.llamacpp.byte_level_bpe_repair
    says why): repaired in place, so that the merged model's saved tokenizer.json converts back to a working llama.cpp
    vocabulary.  Token ids are unchanged (training sees the same tokens)."""
    import json

    from tokenizers import Tokenizer

    from .llamacpp import byte_level_bpe_repair

    backend = getattr(tok, "_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        return False
    fixed = byte_level_bpe_repair(json.loads(backend.to_str()))
    if fixed is None:
        return False
    tok._tokenizer = Tokenizer.from_str(json.dumps(fixed))
    return True


def _chatml_end_of_turn(tok) -> None:
    """ChatML templates end a turn with <|im_end|>: make it the EOS, so that training appends no other end token
    and generation stops there (some GGUF files record <|im_start|> or <|endoftext|> as EOS)."""
    if "<|im_end|>" in (tok.chat_template or "") and tok.eos_token != "<|im_end|>" \
            and tok.convert_tokens_to_ids("<|im_end|>") != tok.unk_token_id:
        tok.eos_token = "<|im_end|>"


def load_base(name: str, cfg, backend: str, for_training: bool = True):
    """The base model and tokenizer, without LoRA."""
    path, gguf = resolve(name, getattr(cfg, "gguf_file", None))
    if backend == "unsloth":
        if gguf:
            raise ModelLoadError(f"{name}: the Unsloth backend loads HF folders; use --backend hf for a .gguf base")
        import_unsloth()
        from unsloth import FastLanguageModel

        loaded = weights_repo(name, cfg, backend)
        try:
            model, tok = FastLanguageModel.from_pretrained(model_name=loaded, max_seq_length=cfg.max_seq_length,
                                                           load_in_4bit=cfg.load_in_4bit, dtype=None,
                                                           use_exact_model_name=True)
        except OSError as e:
            raise _offline_error(name, e, loaded) from None
        _chatml_end_of_turn(tok)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return model, tok

    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict = {}
    on_gpu = torch.cuda.is_available() and not cfg.use_cpu
    if on_gpu:
        from . import dist

        kwargs["dtype"] = compute_dtype()
        kwargs.update(dist.placement())  # this rank's GPU (DDP), or none: FSDP shards and places the weights
        if cfg.load_in_4bit and not gguf and find_spec("bitsandbytes") is not None:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=compute_dtype(), **dist.quant_storage(compute_dtype()))
    else:
        kwargs["dtype"] = torch.float32
    if gguf:
        kwargs["gguf_file"] = gguf
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise _offline_error(name, e) from None
    except (ValueError, struct.error) as e:
        if not gguf:
            raise
        raise _bad_gguf(name, e) from e
    if gguf:
        _forget_gguf_quantization(model)
    tok = load_tokenizer(name, getattr(cfg, "gguf_file", None))
    model.generation_config.eos_token_id = tok.eos_token_id
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def _forget_gguf_quantization(model) -> None:
    """transformers dequantizes GGUF weights to plain tensors on load but keeps a GGUF quantizer attached, which
    makes the Trainer refuse to train and save_pretrained record a quantization it no longer has."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def add_lora(model, cfg, backend: str):
    """A fresh LoRA with the config's rank, alpha and target modules (never embeddings or lm_head)."""
    if backend == "unsloth":
        import_unsloth()
        from unsloth import FastLanguageModel

        return FastLanguageModel.get_peft_model(
            model, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=list(cfg.target_modules), bias="none",
            use_gradient_checkpointing="unsloth" if cfg.gradient_checkpointing else False,
            random_state=cfg.seed)
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def load_for_training(name: str, cfg):
    backend = choose_backend(cfg.backend, cfg.use_cpu)
    if backend == "unsloth":
        import_unsloth()  # before anything below imports transformers or peft
    model, tok = load_base(name, cfg, backend)
    model = add_lora(model, cfg, backend)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    bad = [n for n in trainable if "embed_tokens" in n or "lm_head" in n]
    if bad:
        raise ModelLoadError(f"refusing to train {bad[0]}: embeddings and lm_head stay frozen")
    return model, tok, backend


def save_merged(model, tokenizer, out: str | os.PathLike, backend: str, base_name: str | None = None) -> Path:
    """Writes the LoRA merged into 16-bit weights to ``out`` (a temporary folder renamed when complete)."""
    import shutil

    from .atomic import atomic_folder

    out = Path(out)
    with atomic_folder(out) as tmp:
        if backend == "unsloth":
            # safetensors asked for explicitly: on machines with 2 CPUs or fewer (Colab) Unsloth otherwise saves a
            # pickle (unsloth/save.py unsloth_save_model: only safe_serialization=None forces safetensors there;
            # True is downgraded).
            model.save_pretrained_merged(str(tmp), tokenizer, save_method="merged_16bit", safe_serialization=None)
        elif getattr(model.base_model.model, "is_loaded_in_4bit", False) and base_name:
            # 4-bit base without Unsloth: merge the adapter into a 16-bit copy of the base
            import torch
            from peft import PeftModel
            from transformers import AutoModelForCausalLM

            adapter = tmp / "_adapter"
            model.save_pretrained(adapter)
            base = AutoModelForCausalLM.from_pretrained(resolve(base_name)[0], dtype=torch.bfloat16)
            merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
            shutil.rmtree(adapter)
            merged.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        else:
            merged = model.merge_and_unload()
            merged.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return out
