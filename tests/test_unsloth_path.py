"""The Unsloth path on CPU: Unsloth's own save_pretrained_gguf on the pinned tools folder, import order, the tools
folder Unsloth is pointed at, and the knobs that must mean the same on both backends.

Unsloth runs here through its CPU backend (unsloth 2026.10.9 installed with --no-deps, as .ci/run does).  Everything
that imports unsloth runs in a subprocess: importing it patches transformers and trl for the whole process.
"""

import json
import os
import subprocess
import sys
from importlib.util import find_spec

import pytest

from qmd_unsloth import config as C
from qmd_unsloth.llamacpp import ToolsMissing, check, default_dir
from tests.conftest import REPO, run_module

needs_unsloth = pytest.mark.skipif(find_spec("unsloth") is None,
                                   reason="unsloth not installed (.ci/run installs it with --no-deps)")


def tools_or_skip():
    pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed: bash scripts/install_llama_cpp.sh")
    try:
        return check()
    except ToolsMissing as e:
        pytest.skip(str(e))


# Runs a module as `python -m` would, recording the order in which unsloth, transformers, trl and peft are first
# imported by an import statement (builtins.__import__; importlib.util.find_spec probes are not imports, and
# sys.modules order is no witness: unsloth re-inserts its own entry).
IMPORT_ORDER_RUNNER = r'''
import builtins, json, runpy, sys
order, real_import = [], builtins.__import__
def recording_import(name, *args, **kwargs):
    top = name.partition(".")[0]
    if top in ("unsloth", "transformers", "trl", "peft") and top not in order and top not in sys.modules:
        order.append(top)
    return real_import(name, *args, **kwargs)
builtins.__import__ = recording_import
out, module, sys.argv = sys.argv[1], sys.argv[2], sys.argv[2:]
try:
    runpy.run_module(module, run_name="__main__")
finally:
    open(out, "w").write(json.dumps(order))
'''


def run_recording_imports(tmp_path, module, *args, env=None):
    order_file = tmp_path / "import_order.json"
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    r = subprocess.run([sys.executable, "-c", IMPORT_ORDER_RUNNER, str(order_file), module, *args],
                       capture_output=True, text=True, cwd=REPO, env=full_env, timeout=600)
    return r, json.loads(order_file.read_text()) if order_file.is_file() else []


def test_the_tools_folder_converter_maps_the_tiny_tokenizer_to_qwen2_on_its_own(tiny_model, tmp_path):
    """Unsloth runs `python <tools>/convert_hf_to_gguf.py` as a child process, so the fallback must be in the folder."""
    tools = tools_or_skip()
    out = tmp_path / "tiny-f16.gguf"
    r = subprocess.run([sys.executable, str(tools / "convert_hf_to_gguf.py"), str(tiny_model), "--outfile", str(out),
                        "--outtype", "f16"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "using qwen2" in r.stderr and out.is_file()
    # and the marker that makes Unsloth's install_llama_cpp accept the folder as it is, instead of wiping it
    marker = json.loads((tools / "UNSLOTH_PREBUILT_INFO.json").read_text())
    assert marker["tag"] and marker["repo"]


def test_a_tools_folder_from_before_the_fallback_must_be_prepared_again(tmp_path):
    tools = tools_or_skip()
    old = tmp_path / "old-tools"
    old.mkdir()
    for name in ("convert_hf_to_gguf.py", "llama-quantize"):
        (old / name).write_bytes((tools / name).read_bytes())
    for sub in ("conversion", "gguf-py/gguf"):
        (old / sub).mkdir(parents=True)
        (old / sub / "__init__.py").write_text("")
    (old / "TOOLS.json").write_text(json.dumps({"llama_cpp_python": "0.3.36"}))
    with pytest.raises(ToolsMissing, match="prepared by an older qmd_unsloth .* prepare it again with: python -m "
                                           "qmd_unsloth.llamacpp prepare --dir"):
        check(old)


@needs_unsloth
def test_unsloth_save_pretrained_gguf_exports_a_verified_q4_k_m_on_cpu(tiny_model, tmp_path):
    """export --backend unsloth end to end: Unsloth's CPU backend loads the model and runs its save_pretrained_gguf
    on the pinned tools folder (its converter as a child process, our llama-quantize); the file is then verified
    by llama.cpp.  Unsloth is imported before transformers, trl and peft."""
    tools_or_skip()
    out = tmp_path / "gguf"
    r, order = run_recording_imports(tmp_path, "qmd_unsloth.export", "--model", str(tiny_model), "--out", str(out),
                                     "--backend", "unsloth")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "llama.cpp found at" in r.stdout + r.stderr, (r.stdout + r.stderr)[-3000:]  # used as is: no install
    report = json.loads((out / "export.json").read_text())
    assert report["backend"] == "unsloth"
    info = report["files"]["qmd-query-expansion-q4_k_m.gguf"]
    assert info["file_type"] == "Q4_K_M" and info["pre_tokenizer"] == "qwen2"
    assert info["prompt_matches_training"] and info["eos_token"] == "<|im_end|>"
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "export.json", "qmd-query-expansion-q4_k_m.gguf"]
    assert order[0] == "unsloth", order


@needs_unsloth
def test_unsloth_imported_with_another_llama_cpp_folder_is_a_one_line_error(tiny_model, tmp_path):
    """UNSLOTH_LLAMA_CPP_PATH is read once, when unsloth_zoo is imported: an export in a process whose unsloth points
    elsewhere must stop with one line, not use (or install into) the other folder."""
    tools = tools_or_skip()
    elsewhere = tmp_path / "elsewhere"
    # unsloth's GPU init imports unsloth_zoo.llama_cpp through unsloth/save.py; its CPU backend does not, so do it here
    code = ("import unsloth, unsloth_zoo.llama_cpp\nfrom qmd_unsloth.export import main\n"
            f"raise SystemExit(main(['--model', {str(tiny_model)!r}, '--out', {str(tmp_path / 'o')!r}, "
            "'--backend', 'unsloth']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(REPO), "UNSLOTH_LLAMA_CPP_PATH": str(elsewhere)})
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: unsloth was imported with UNSLOTH_LLAMA_CPP_PATH={elsewhere}, not the llama.cpp tools folder "
        f"{tools}; set UNSLOTH_LLAMA_CPP_PATH={tools} before starting Python (or pass that folder as "
        "--llama-cpp-dir)")
    assert not elsewhere.exists()  # nothing was installed there


@needs_unsloth
def test_importing_qmd_unsloth_first_points_unsloth_at_the_tools_folder(tmp_path):
    """In-process flows (train, then export) import unsloth during training: qmd_unsloth.model sets the folder first."""
    code = ("import qmd_unsloth.model, unsloth, unsloth_zoo.llama_cpp as z\n"
            "print('DIR=' + z.LLAMA_CPP_DEFAULT_DIR)")
    env = {**os.environ, "PYTHONPATH": str(REPO), "QMD_UNSLOTH_CACHE": str(tmp_path / "cache")}
    env.pop("UNSLOTH_LLAMA_CPP_PATH", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"DIR={tmp_path / 'cache' / 'llama.cpp'}" in r.stdout.splitlines()


def test_export_tools_folder_default_follows_qmd_unsloth_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QMD_UNSLOTH_CACHE", str(tmp_path))
    assert C.load(C.ExportConfig).llama_cpp_dir == tmp_path / "llama.cpp" == default_dir()


def test_export_backend_can_be_forced(tmp_path):
    from qmd_unsloth.export import export_backend

    assert export_backend("llama.cpp") == "llama.cpp"
    assert export_backend("auto") == "llama.cpp"  # no CUDA here
    if find_spec("unsloth") is not None:
        assert export_backend("unsloth") == "unsloth"
    r = run_module("qmd_unsloth.export", "--backend", "vllm", "--model", str(tmp_path))
    assert r.returncode == 2 and "backend" in r.stderr and "Traceback" not in r.stderr


def test_grpo_knobs_are_explicit_and_dr_grpo_needs_unscaled_rewards():
    from qmd_unsloth.grpo import grpo_settings

    cfg = C.load(C.GRPOConfig)
    s = grpo_settings(cfg, fast=False)
    # every knob Unsloth's patched GRPOConfig would otherwise choose (unsloth/models/rl.py) is passed explicitly
    assert s == {"loss_type": "dapo", "beta": 0.04, "scale_rewards": "group", "importance_sampling_level": "token",
                 "mask_truncated_completions": False, "epsilon_high": 0.2,
                 "vllm_importance_sampling_correction": False}
    assert grpo_settings(cfg, fast=True)["vllm_importance_sampling_correction"] is True
    gspo = C.load(C.GRPOConfig, importance_sampling_level="sequence", loss_type="grpo")
    assert grpo_settings(gspo, fast=False)["importance_sampling_level"] == "sequence"
    with pytest.raises(C.ConfigError, match="scale_rewards: loss_type dr_grpo needs scale_rewards: none"):
        C.load(C.GRPOConfig, loss_type="dr_grpo")
    assert C.load(C.GRPOConfig, loss_type="dr_grpo", scale_rewards="none").loss_type == "dr_grpo"


def test_offline_error_names_the_repo_actually_loaded():
    from qmd_unsloth.model import _offline_error

    msg = str(_offline_error("Qwen/Qwen3-1.7B", OSError(), "unsloth/Qwen3-1.7B-unsloth-bnb-4bit"))
    assert msg.startswith("Qwen/Qwen3-1.7B (loaded as unsloth/Qwen3-1.7B-unsloth-bnb-4bit, Unsloth's pre-quantized")
    assert "(hf download unsloth/Qwen3-1.7B-unsloth-bnb-4bit)" in msg


def test_weights_repo_is_the_name_itself_off_the_unsloth_4bit_cuda_path(tiny_model):
    from qmd_unsloth.model import weights_repo

    cfg = C.load(C.SFTConfig)
    assert weights_repo(str(tiny_model), cfg, "unsloth") == str(tiny_model)  # a local folder is loaded as is
    assert weights_repo("Qwen/Qwen3-1.7B", cfg, "hf") == "Qwen/Qwen3-1.7B"
    # no CUDA here: Unsloth's CPU backend loads 16-bit weights of the named repo
    assert weights_repo("Qwen/Qwen3-1.7B", cfg, "unsloth") == "Qwen/Qwen3-1.7B"


@needs_unsloth
def test_the_cuda_save_paths_converter_preparation_accepts_the_tools_folder(tiny_model, tmp_path):
    """On CUDA, save_pretrained_gguf goes through unsloth/save.py save_to_gguf: check_llama_cpp(), then
    unsloth_zoo's _download_convert_hf_to_gguf() writes a branded converter into the folder, run as a child process.
    Both run here offline on a copy of the folder, and the branded converter still maps the tiny tokenizer to qwen2."""
    import shutil

    tools = tmp_path / "tools"
    shutil.copytree(tools_or_skip(), tools)
    code = ("import unsloth\n"
            "from unsloth_zoo.llama_cpp import check_llama_cpp, _download_convert_hf_to_gguf, use_local_gguf\n"
            "print('QUANTIZER=' + check_llama_cpp()[0])\n"
            "with use_local_gguf():\n"
            "    print('CONVERTER=' + _download_convert_hf_to_gguf()[0])\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "UNSLOTH_LLAMA_CPP_PATH": str(tools),
           "UNSLOTH_LLAMA_CPP_OFFLINE": "1", "UNSLOTH_AUTO_INSTALL": "0"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = dict(l.split("=", 1) for l in r.stdout.splitlines() if l.startswith(("QUANTIZER=", "CONVERTER=")))
    assert lines["QUANTIZER"] == str(tools / "llama-quantize")
    converter = lines["CONVERTER"]
    assert converter.startswith(str(tools))  # the folder's own converter, not one fetched from the network
    out = tmp_path / "tiny-bf16.gguf"
    r = subprocess.run([sys.executable, converter, str(tiny_model), "--outfile", str(out), "--outtype", "bf16"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and out.is_file(), r.stderr[-2000:]
