"""qmd_unsloth: train QMD's query-expansion model (Qwen3-1.7B, QLoRA via Unsloth) and ship it as a Q4_K_M GGUF."""

__version__ = "0.1.0"
