"""Expected GPU memory per process for the Qwen3-4B / Qwen3-8B presets: an ESTIMATE from parameter counts, not measured.

    python benchmarks/memory_estimate.py [--out benchmarks/results/memory_estimate.json]

Parameters are counted exactly on a meta-device model built from the published Qwen3 shapes (no weights needed).
Per process, for the transformers + peft path (Unsloth's fused loss and kernels need less):
- base weights: NF4 linear layers at 4.127 bits per weight (4 bits + double-quantised absmax per 64 weights),
  embeddings, lm_head and norms in 16-bit; or all 16-bit without load_in_4bit; under FSDP divided by the processes
  plus two gathered decoder layers (the one running and the one prefetched);
- LoRA: fp32 weight + fp32 gradient + two fp32 Adam moments = 16 bytes per trainable parameter (sharded by FSDP);
- activations with gradient checkpointing: every layer's input kept (2 bytes x batch x seq x hidden) plus one layer
  recomputed in full, ~34 bytes x batch x seq x hidden (Korthikanti et al. 2022, no s^2 term with SDPA attention);
- logits: batch x seq x vocab x 10 bytes (bf16 logits, their fp32 copy for the loss, its fp32 gradient);
- GRPO adds the generation KV cache (2 x layers x kv_heads x head_dim x 2 bytes per token) and scores completions;
- 1.0 GiB for the CUDA context and kernels, then 10% for allocator fragmentation.
Sequences are taken at max_seq_length (a batch whose longest row hits the limit): the shipped data's rows are
~150 tokens, so real runs usually sit well below these figures.
"""

import argparse
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GIB = 1024 ** 3
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Published shapes (config.json of Qwen/Qwen3-4B and Qwen/Qwen3-8B on the hub)
SHAPES = {
    "Qwen/Qwen3-4B": dict(vocab_size=151_936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                          num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "Qwen/Qwen3-8B": dict(vocab_size=151_936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                          num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
}


def count(name: str, lora_r: int, targets: tuple[str, ...]) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    cfg = Qwen3Config(**SHAPES[name])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    total = sum(p.numel() for p in model.parameters())  # tied weights counted once
    linear = lora = layer = 0
    for mod_name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and mod_name.split(".")[-1] in PROJECTIONS:
            linear += mod.weight.numel()
            if mod_name.split(".")[-1] in targets:
                lora += lora_r * (mod.in_features + mod.out_features)
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    return {"params": total, "linear_params": linear, "other_params": total - linear, "lora_params": lora,
            "layer_params": layer, "config": cfg}


def estimate(name: str, preset: dict) -> dict:
    stage, b, seq = preset["stage"], preset["per_device"], preset["max_seq_length"]
    n, fsdp, four_bit = preset["processes"], preset.get("fsdp", False), preset["load_in_4bit"]
    targets = PROJECTIONS if stage == "sft" else ("q_proj", "v_proj")
    c = count(name, preset["lora_r"], targets)
    cfg = c["config"]
    h, layers, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    weights = c["linear_params"] * 4.127 / 8 + c["other_params"] * 2 if four_bit else c["params"] * 2
    lora = c["lora_params"] * 16
    if fsdp:
        weights = weights / n + 2 * c["layer_params"] * 2
        lora /= n
    if stage == "sft":
        tokens = b * seq
        logit_tokens = tokens
        kv = 0
    else:  # GRPO: b completions per process of max_completion_length after a prompt of ~64 tokens
        tokens = b * (64 + preset["max_completion_length"])
        logit_tokens = b * preset["max_completion_length"]
        kv = tokens * 2 * layers * cfg.num_key_value_heads * cfg.head_dim * 2
    acts = tokens * h * 2 * layers + tokens * h * 34
    logits = logit_tokens * vocab * 10
    parts = {"weights": weights, "lora_and_adam": lora, "activations": acts, "logits": logits, "kv_cache": kv}
    total = (sum(parts.values()) + 1.0 * GIB) * 1.10
    return {"model": name, **{k: v for k, v in preset.items()}, "params_billion": round(c["params"] / 1e9, 3),
            "lora_params_million": round(c["lora_params"] / 1e6, 2),
            "parts_gib": {k: round(v / GIB, 2) for k, v in parts.items()}, "estimate_gib_per_gpu": round(total / GIB, 1)}


def presets() -> list[dict]:
    """The configs/presets/*-qwen3-* files, read as the trainer reads them."""
    import yaml

    out = []
    for path in sorted((Path(__file__).resolve().parent.parent / "configs" / "presets").glob("*-qwen3-*.yaml")):
        y = yaml.safe_load(path.read_text())
        stage = path.name.split("-")[0]
        name = "Qwen/Qwen3-8B" if "qwen3-8b" in path.name else "Qwen/Qwen3-4B"  # GRPO presets name the SFT run
        gpus = 2 if "-2x" in path.name else 1
        out.append({"preset": path.name, "name": name, "stage": stage, "processes": gpus,
                    "fsdp": "fsdp" in path.name, "load_in_4bit": y.get("load_in_4bit", True),
                    "per_device": y["per_device_train_batch_size"], "accumulation": y.get("gradient_accumulation_steps", 1),
                    "max_seq_length": y.get("max_seq_length", 512), "lora_r": y.get("lora_r", 16 if stage == "sft" else 4),
                    "max_completion_length": y.get("max_completion_length", 200)})
    # not a preset: why the 16-bit Qwen3-8B needs FSDP (one card would hold the whole bf16 model)
    out.append({"preset": "(16-bit 8B on one card)", "name": "Qwen/Qwen3-8B", "stage": "sft", "processes": 1,
                "fsdp": False, "load_in_4bit": False, "per_device": 4, "accumulation": 4, "max_seq_length": 512,
                "lora_r": 16, "max_completion_length": 200})
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "memory_estimate.json"))
    args = ap.parse_args()
    rows = []
    print(f"{'preset':<34} {'model':<14} {'GPUs':>4} {'batch':>11} {'params':>7} {'est. GiB/GPU':>12}")
    for p in presets():
        name = p.pop("name")
        r = estimate(name, p)
        rows.append(r)
        eff = p["per_device"] * p["accumulation"] * p["processes"]
        print(f"{p['preset']:<34} {name.split('/')[1]:<14} {p['processes']:>4} "
              f"{p['per_device']}x{p['accumulation']}x{p['processes']}={eff:<4} {r['params_billion']:>6}B "
              f"{r['estimate_gib_per_gpu']:>12}")
    out = {"kind": "estimate from parameter counts (not measured)", "machine": platform.node(),
           "python": platform.python_version(), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
