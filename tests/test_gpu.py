"""GPU suite: the Unsloth 4-bit path, load -> SFT -> GRPO -> merge, on a Qwen3-1.7B-shaped model with random weights.

Run on a CUDA machine with the `gpu` extra installed:  python -m pytest -m gpu tests/test_gpu.py
Skipped without CUDA or without unsloth.  Random weights generate to the token cap in GRPO: that is expected.
"""

import json
from importlib.util import find_spec

import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(find_spec("unsloth") is None, reason="needs unsloth (pip install '.[gpu]')"),
]


@pytest.fixture(scope="module")
def qwen3_1_7b_shaped(tmp_path_factory, tiny_model):
    """The published Qwen3-1.7B shape with random bf16 weights and the tiny tokenizer (ids < 4096 are valid)."""
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    from qmd_unsloth.tiny import qwen3_1_7b_config

    out = tmp_path_factory.mktemp("qwen3-1.7b-random")
    tok = AutoTokenizer.from_pretrained(tiny_model)
    cfg = qwen3_1_7b_config()
    cfg.eos_token_id, cfg.pad_token_id = tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen3ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    del model
    torch.cuda.empty_cache()
    return out


def test_unsloth_4bit_sft_grpo_merge(qwen3_1_7b_shaped, tmp_path):
    from qmd_unsloth import config as C
    from qmd_unsloth import grpo, sft
    from qmd_unsloth.model import choose_backend

    assert choose_backend("auto") == "unsloth"
    sft_cfg = C.load(C.SFTConfig, None, base_model=str(qwen3_1_7b_shaped), output_dir=tmp_path, run_name="sft",
                     max_steps=10, logging_steps=2, eval_steps=10, save_steps=10, report_to=[])
    torch.cuda.reset_peak_memory_stats()
    merged = sft.run(sft_cfg)
    sft_peak = torch.cuda.max_memory_allocated() / 2**30
    metrics = json.loads((merged.parent / "metrics.json").read_text())
    assert metrics["backend"] == "unsloth" and metrics["global_step"] == 10
    assert (merged / "config.json").is_file()

    grpo_cfg = C.load(C.GRPOConfig, None, sft_model=str(merged), output_dir=tmp_path, run_name="grpo", max_steps=4,
                      max_completion_length=64, logging_steps=1, save_steps=4, report_to=[])
    torch.cuda.reset_peak_memory_stats()
    grpo_merged = grpo.run(grpo_cfg)
    grpo_peak = torch.cuda.max_memory_allocated() / 2**30
    gm = json.loads((grpo_merged.parent / "metrics.json").read_text())
    assert gm["backend"] == "unsloth" and any("reward" in h for h in gm["log_history"])
    print(f"\nGPU {torch.cuda.get_device_name(0)}: SFT peak {sft_peak:.1f} GiB, GRPO peak {grpo_peak:.1f} GiB")


def test_unsloth_save_pretrained_gguf_export(qwen3_1_7b_shaped, tmp_path):
    """Q4_K_M through Unsloth's own save_pretrained_gguf, pointed at the pinned tools folder (prepare it first with
    `bash scripts/install_llama_cpp.sh`; the GPU machine has no network)."""
    from qmd_unsloth import config as C
    from qmd_unsloth.export import export
    from qmd_unsloth.llamacpp import DEFAULT_DIR, check

    check(DEFAULT_DIR)
    report = export(C.load(C.ExportConfig, None, model=qwen3_1_7b_shaped, out=tmp_path / "gguf"))
    assert report["backend"] == "unsloth"
    info = report["files"]["qmd-query-expansion-q4_k_m.gguf"]
    assert info["file_type"] == "Q4_K_M" and info["prompt_matches_training"]
    print(f"\nQ4_K_M of the 1.7B shape: {info['bytes'] / 2**30:.2f} GiB, {info['bits_per_weight']} bits/weight")
