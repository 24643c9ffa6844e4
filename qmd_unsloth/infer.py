"""Expansions from a HF model folder: QMD's prompt (as in training), generation stopped at the end-of-turn token."""

from __future__ import annotations

import struct


def expand(model, tokenizer, queries: list[str], greedy: bool = True, max_new_tokens: int = 256,
           temperature: float = 0.7, top_k: int = 20, top_p: float = 0.8) -> list[str]:
    """One completion per query (the generated text after the prompt, special tokens kept for the reward)."""
    import torch

    from .prompt import format_of_tokenizer

    tokenizer.padding_side = "left"
    fmt = format_of_tokenizer(tokenizer, getattr(model.config, "model_type", None))
    prompts = [fmt.prompt(q) for q in queries]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    sampling = {} if greedy else {"temperature": temperature, "top_k": top_k, "top_p": top_p}
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=not greedy,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **sampling)
    new = out[:, batch["input_ids"].shape[1]:]
    texts = []
    for row in new:
        ids = row.tolist()
        if tokenizer.eos_token_id in ids:  # keep the end token (the reward strips one), drop the padding after it
            ids = ids[: ids.index(tokenizer.eos_token_id) + 1]
        texts.append(tokenizer.decode(ids, skip_special_tokens=False))
    return texts


def load(path: str):
    from transformers import AutoModelForCausalLM

    from .model import _bad_gguf, _offline_error, load_tokenizer, resolve

    folder, gguf = resolve(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf) if gguf else \
            AutoModelForCausalLM.from_pretrained(folder)
    except OSError as e:  # missing weights, a broken config.json, a hub id not in the cache
        raise _offline_error(path, e) from None
    except (ValueError, struct.error) as e:
        if not gguf:
            raise
        raise _bad_gguf(path, e) from e
    return model.eval(), load_tokenizer(path)
