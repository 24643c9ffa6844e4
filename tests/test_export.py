"""GGUF export of the tiny model through llama.cpp's converter and quantizer, verified by llama.cpp (CPU, offline).

Needs llama-cpp-python and the tools folder: `bash scripts/install_llama_cpp.sh` (CI runs it); skipped otherwise.
"""

import json
import shutil

import pytest

from qmd_unsloth import config as C
from qmd_unsloth.llamacpp import DEFAULT_DIR, ToolsMissing, check
from tests.conftest import run_module

pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed: bash scripts/install_llama_cpp.sh")
try:
    check(DEFAULT_DIR)
except ToolsMissing as e:  # pragma: no cover - depends on the machine
    pytest.skip(str(e), allow_module_level=True)


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    from qmd_unsloth.export import export

    out = tmp_path_factory.mktemp("gguf")
    report = export(C.load(C.ExportConfig, None, model=tiny_model, out=out, also=["q8_0"]))
    return out, report


def test_q4_k_m_and_q8_0_are_written_and_verified(exported):
    out, report = exported
    q4 = report["files"]["qmd-query-expansion-q4_k_m.gguf"]
    q8 = report["files"]["qmd-query-expansion-q8_0.gguf"]
    assert q4["file_type"] == "Q4_K_M" and "Q4_K" in q4["tensor_types"]
    assert q8["file_type"] == "Q8_0" and "Q8_0" in q8["tensor_types"]
    for info in (q4, q8):
        assert info["eos_token"] == "<|im_end|>" and info["architecture"] == "qwen3"
        assert info["prompt_matches_training"] is True
        assert 0 < info["smoke_generation"]["tokens"] <= 32
    assert q4["bytes"] < q8["bytes"] and q4["bits_per_weight"] < q8["bits_per_weight"]
    assert (out / "qmd-query-expansion-q4_k_m.gguf").is_file()
    assert json.loads((out / "export.json").read_text())["backend"] == "llama.cpp"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_verified_is_said_only_when_every_named_check_passed(exported):
    """export requires every check but the parse of the smoke generation (an undertrained model may write a degenerate
    line); "verified" is recorded and printed only when that passed too."""
    from qmd_unsloth.gguf_check import describe_checks

    out, report = exported
    for info in report["files"].values():
        c = info["checks"]
        assert c["header"] and c["llama_cpp_load"] and c["eos"] == "<|im_end|>" and c["chat_wrapper"] == "Qwen"
        parses = info["smoke_generation"]["hard_failure"] is None
        assert c["smoke_generation_parses"] == parses and c["wrapper_matches_training"] is True
        assert info["verified"] == parses
        assert describe_checks(info).startswith("verified: " if parses else "checked (")
    info = json.loads(json.dumps(next(iter(report["files"].values()))))
    info["checks"]["smoke_generation_parses"], info["verified"] = False, False
    info["smoke_generation"]["hard_failure"] = "line 1 has no lex:/vec:/hyde: prefix"
    said = describe_checks(info)
    assert said.startswith("checked (QMD's Qwen wrapper as trained; header, EOS, llama.cpp load")
    assert "not verified: its generation does not parse under the reward (line 1 has no" in said
    info["checks"]["wrapper_matches_training"] = False
    assert "not compared with the training one" in describe_checks(info)
    assert describe_checks({"file_type": "Q4_K_M"}) == "header only (not verified)"


def test_qmd_wraps_the_exported_model_as_it_was_trained(exported):
    from qmd_unsloth.export import read_gguf
    from qmd_unsloth.prompt import QWEN3, chat_format

    out, report = exported
    info = read_gguf(out / "qmd-query-expansion-q4_k_m.gguf", DEFAULT_DIR)
    # node-llama-cpp picks its wrapper from the embedded template and the architecture: Qwen, as in training
    assert chat_format(info["chat_template"], info["architecture"], info["bos_token"]) == QWEN3
    assert report["files"]["qmd-query-expansion-q4_k_m.gguf"]["chat_format"] == {"wrapper": "Qwen", "bos": ""}


def test_llama_cpp_tokenizes_the_prompt_like_the_hf_tokenizer(exported, tiny_model):
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from qmd_unsloth.prompt import render_prompt

    out, _ = exported
    prompt = render_prompt("docker volumes")
    llm = Llama(model_path=str(out / "qmd-query-expansion-q4_k_m.gguf"), n_ctx=256, verbose=False)
    hf = AutoTokenizer.from_pretrained(tiny_model)
    assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == hf(prompt, add_special_tokens=False)["input_ids"]
    llm.close()


def test_modelfile_gives_ollama_qmds_context_and_sampling(exported):
    from qmd_unsloth.prompt import render_prompt

    out, _ = exported
    text = (out / "Modelfile").read_text()
    assert "FROM ./qmd-query-expansion-q4_k_m.gguf" in text
    for line in ("PARAMETER temperature 0.7", "PARAMETER top_k 20", "PARAMETER top_p 0.8", "PARAMETER min_p 0.0",
                 "PARAMETER stop <|im_end|>", "PARAMETER num_predict 600"):
        assert line in text
    assert "<think>" not in text
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    system = text.split('SYSTEM """', 1)[1].split('"""', 1)[0]
    prompt = "/no_think Expand this search query: auth config"
    assert template.replace("{{ .System }}", system).replace("{{ .Prompt }}", prompt) == render_prompt("auth config")


def test_missing_tools_is_a_one_line_error(tiny_model, tmp_path):
    r = run_module("qmd_unsloth.export", "--model", str(tiny_model), "--out", str(tmp_path / "o"),
                   "--llama-cpp-dir", str(tmp_path / "none"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == (f"error: llama.cpp tools: {tmp_path / 'none' / 'convert_hf_to_gguf.py'} is missing; "
                                f"prepare them with: python -m qmd_unsloth.llamacpp prepare --dir {tmp_path / 'none'}")


def test_a_file_that_fails_verification_never_reaches_its_final_name(tiny_model, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model, bad)
    cfg = json.loads((bad / "tokenizer_config.json").read_text())
    cfg["eos_token"] = "<|endoftext|>"  # the exported EOS would not be <|im_end|>
    (bad / "tokenizer_config.json").write_text(json.dumps(cfg))
    gen = json.loads((bad / "config.json").read_text())
    gen["eos_token_id"] = 0
    (bad / "config.json").write_text(json.dumps(gen))
    r = run_module("qmd_unsloth.export", "--model", str(bad), "--out", str(tmp_path / "o"))
    assert r.returncode == 1 and "EOS token is '<|endoftext|>', expected '<|im_end|>'" in r.stderr
    assert "Traceback" not in r.stderr
    assert list((tmp_path / "o").iterdir()) == []


def test_an_adapter_is_merged_onto_its_base_and_exported(tiny_model, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "adapter")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path / "adapter")
    r = run_module("qmd_unsloth.export", "--model", str(tmp_path / "adapter"), "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((tmp_path / "o" / "export.json").read_text())
    assert report["source_kind"] == "adapter"
    assert report["files"]["qmd-query-expansion-q4_k_m.gguf"]["file_type"] == "Q4_K_M"


def _tiny_llama(dst, tiny_model, pre_tokenizer=None):
    """A tiny Llama-architecture model (random weights) with the tiny tokenizer saved the way transformers saves a
    tokenizer it built from a byte-level-BPE ``llama`` GGUF such as SmolLM2's: ``byte_fallback`` on and Llama 2's
    decoder (docs/export.md).  ``pre_tokenizer`` replaces its ByteLevel pre-tokenizer (a vocabulary that looks like
    SentencePiece but has no ``<0xNN>`` byte tokens)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # bos_token_id None: the tiny tokenizer has no BOS token, so the GGUF must name none either (with one, QMD's
    # ChatML wrapper would write it first and the export's wrapper check would rightly refuse the file)
    LlamaForCausalLM(LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                 max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=None,
                                 eos_token_id=2, pad_token_id=0)).save_pretrained(dst)
    for f in ("tokenizer_config.json", "chat_template.jinja"):
        if (tiny_model / f).exists():
            shutil.copy(tiny_model / f, dst / f)
    state = json.loads((tiny_model / "tokenizer.json").read_text())
    state["model"]["byte_fallback"] = True
    state["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True}]}
    if pre_tokenizer:
        state["pre_tokenizer"] = pre_tokenizer
    (dst / "tokenizer.json").write_text(json.dumps(state))
    return dst


def test_a_byte_level_bpe_marked_byte_fallback_is_repaired_and_exports(tiny_model, tmp_path):
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from qmd_unsloth.prompt import render_prompt

    src = _tiny_llama(tmp_path / "llama", tiny_model)
    before = (src / "tokenizer.json").read_bytes()
    r = run_module("qmd_unsloth.export", "--model", str(src), "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "byte-level BPE marked byte_fallback" in r.stdout
    assert (src / "tokenizer.json").read_bytes() == before  # the model folder is not touched
    report = json.loads((tmp_path / "o" / "export.json").read_text())
    assert report["tokenizer_repaired"] is True
    gguf = tmp_path / "o" / "qmd-query-expansion-q4_k_m.gguf"
    assert report["files"][gguf.name]["pre_tokenizer"] == "qwen2"  # byte-level BPE, not SentencePiece
    prompt = render_prompt("docker volumes 2024 café")
    llm = Llama(model_path=str(gguf), n_ctx=256, verbose=False, vocab_only=True)
    hf = AutoTokenizer.from_pretrained(src)
    assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == hf(prompt, add_special_tokens=False)["input_ids"]
    llm.close()
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["Modelfile", "export.json", gguf.name]


def test_a_llama_cpp_abort_on_a_broken_vocabulary_is_one_line_and_leaves_nothing(tiny_model, tmp_path):
    src = _tiny_llama(tmp_path / "llama", tiny_model,
                      {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False})
    r = run_module("qmd_unsloth.export", "--model", str(src), "--out", str(tmp_path / "o"))
    assert r.returncode == 1 and "Traceback" not in r.stderr and "#0 " not in r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith("error: qmd-query-expansion-q4_k_m.gguf: llama.cpp aborted while tokenizing")
    assert "SIGABRT: std::out_of_range: unordered_map::at" in lines[0]
    assert list((tmp_path / "o").iterdir()) == []  # no temporary folder, nothing under a final name


def test_aborted_names_the_signal_and_the_cpp_message():
    from qmd_unsloth.llamacpp import aborted

    stderr = ("llama_model_loader: ...\nterminate called after throwing an instance of 'std::out_of_range'\n"
              "  what():  unordered_map::at\n")
    assert aborted(-6, stderr) == "SIGABRT: std::out_of_range: unordered_map::at"
    assert aborted(134, stderr) == "SIGABRT: std::out_of_range: unordered_map::at"
    assert aborted(-11, "") == "SIGSEGV"
    assert aborted(-6, "/src/ggml.c:123: GGML_ASSERT(ne % 32 == 0) failed\n").endswith("GGML_ASSERT(ne % 32 == 0) failed")
    assert aborted(1, stderr) is None and aborted(0, "") is None
