"""A tiny Qwen3-architecture model built offline (random weights, local byte-level BPE, the real Qwen3 template).

    python -m qmd_unsloth.tiny --out runs/tiny-qwen3

Used by the tests, the smoke run and CI instead of weights from the hub.  Hidden and intermediate sizes and
heads x head_dim are multiples of 256 so that K-quants apply in GGUF export.  ``qwen3_1_7b_config()`` gives the
published Qwen3-1.7B shape for the GPU tests and benchmarks (random weights too).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .cli import command
from .atomic import atomic_folder, atomic_write_text
from .data import DEFAULT_DATA_DIR, data_files
from .prompt import qwen3_chat_template

TINY_VERSION = 4  # bump when the recipe or its corpus (data/*.jsonl) changes: cached copies are rebuilt
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
# Qwen2/Qwen3's pre-tokenizer split, so llama.cpp's converter can treat the tokenizer as "qwen2".
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
DEFAULT_DIR = Path(os.environ.get("QMD_UNSLOTH_CACHE", Path.home() / ".cache" / "qmd_unsloth")) / f"tiny-qwen3-v{TINY_VERSION}"


def tiny_config_kwargs(vocab_size: int) -> dict:
    return dict(vocab_size=vocab_size, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024,
                tie_word_embeddings=True, rope_theta=1_000_000.0, rms_norm_eps=1e-6)


def qwen3_1_7b_config():
    """Qwen3-1.7B's published shape (for random-weight GPU tests and benchmarks)."""
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=151_936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40_960,
                       tie_word_embeddings=True, rope_theta=1_000_000.0, rms_norm_eps=1e-6, torch_dtype="bfloat16")


def build_qwen3_1_7b_shaped(out: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """Qwen3-1.7B's shape with random bf16 weights and the tiny tokenizer (ids < 4096 are valid), for GPU tests and
    benchmarks on a machine without the hub; built on CUDA when present.  Written atomically."""
    import torch
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    out = Path(out)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir or ensure())
    cfg = qwen3_1_7b_config()
    cfg.eos_token_id, cfg.pad_token_id = tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen3ForCausalLM(cfg).to(torch.bfloat16)
    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def _corpus(data_paths) -> list[str]:
    """Text to train the BPE on: the shipped queries and answers and the prompt wording."""
    from .qmd_contract import DEFAULT_SYSTEM_PROMPT, USER_TEMPLATE

    # QMD's fixed prompt text many times over, so the BPE learns merges for it (a short prompt in tokens)
    texts = [DEFAULT_SYSTEM_PROMPT, USER_TEMPLATE.format(query=""), "lex: vec: hyde:"] * 200
    for path in data_files(data_paths):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
                texts.append(row["query"])
                texts.extend(f"{k}: {t}" for k, t in row["output"])
            except (ValueError, KeyError, TypeError):
                continue
    return texts


def build_tokenizer(vocab_size: int = 4096, data_paths=None):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(data_paths or [DEFAULT_DATA_DIR]), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=qwen3_chat_template(), model_max_length=1024,
                                   clean_up_tokenization_spaces=False)


def build(out: str | os.PathLike = DEFAULT_DIR, seed: int = 0, vocab_size: int = 4096, data_paths=None) -> Path:
    """Writes the tiny model and tokenizer to ``out`` (atomically: a temporary folder renamed at the end)."""
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    out = Path(out)
    tokenizer = build_tokenizer(vocab_size, data_paths)
    torch.manual_seed(seed)
    config = Qwen3Config(**tiny_config_kwargs(len(tokenizer)), bos_token_id=None,
                         eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                         pad_token_id=tokenizer.pad_token_id)
    model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_text(tmp / "TINY_MODEL.json", json.dumps({"version": TINY_VERSION, "seed": seed}) + "\n")
    return out


def ensure(out: str | os.PathLike = DEFAULT_DIR) -> Path:
    """The tiny model folder, built on first use."""
    out = Path(out)
    marker = out / "TINY_MODEL.json"
    if marker.is_file() and json.loads(marker.read_text()).get("version") == TINY_VERSION:
        return out
    return build(out)


@command("tiny")
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qmd_unsloth.tiny", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(DEFAULT_DIR), help=f"output folder (default: {DEFAULT_DIR})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shape", choices=["tiny", "qwen3-1.7b"], default="tiny",
                    help="qwen3-1.7b: the published Qwen3-1.7B shape, random weights, tiny tokenizer (GPU checks)")
    args = ap.parse_args(argv)
    if args.shape == "qwen3-1.7b":
        path = build_qwen3_1_7b_shaped(args.out, seed=args.seed)
    else:
        path = build(args.out, args.seed)
    print(f"wrote the {args.shape} Qwen3 model to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
