"""Writes notebooks/colab_qmd_unsloth.ipynb and notebooks/kaggle_qmd_unsloth.ipynb (outputs cleared).

    python scripts/make_notebooks.py

The notebooks are generated so that the two stay in step; edit this file, not the .ipynb files.  Each has a
``parameters`` cell (SMOKE=False); tests set SMOKE=True and execute them top to bottom on CPU with the tiny model.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

REPO = Path(__file__).resolve().parent.parent

# Both platforms: Unsloth from the registry, then this project and the pinned llama.cpp tools.
INSTALL = ("run([sys.executable, '-m', 'pip', 'install', '-q', 'unsloth'])\n"
           "if not Path('qmd_unsloth').exists():\n"
           "    run(['git', 'clone', '-q', REPO_URL, 'qmd_unsloth'])\n"
           "os.chdir('qmd_unsloth')\n"
           "run([sys.executable, '-m', 'pip', 'install', '-q', '-e', '.[gpu]'])\n"
           "# llama.cpp: a pre-built llama-cpp-python wheel where one exists (no 10-15 min compile), then the pinned\n"
           "# tools folder from its source distribution (scripts/install_llama_cpp.sh)\n"
           "run(['bash', 'scripts/install_llama_cpp.sh', '--prebuilt'])")

PLATFORM = {
    "colab": {
        "title": "Colab",
        "first": ("import os\n"
                  "WORK = '/content/runs'          # Colab's disk; download the GGUF at the end"),
        "install": "# Unsloth's recommended Colab install: pip install unsloth (it brings a matching torch stack)\n"
                   + INSTALL,
        "download": ("if not SMOKE:\n"
                     "    from google.colab import files\n"
                     "    files.download(str(GGUF))"),
    },
    "kaggle": {
        "title": "Kaggle",
        "first": ("import os\n"
                  "# Kaggle's 2xT4: Unsloth trains on one GPU; set this BEFORE unsloth or torch is imported\n"
                  "os.environ['CUDA_VISIBLE_DEVICES'] = '0'\n"
                  "# large files go outside /kaggle/working (its 20 GB output limit); copy the GGUF back at the end\n"
                  "WORK = '/kaggle/tmp/runs'"),
        "install": "# Unsloth's recommended Kaggle install (internet must be on in the notebook settings)\n"
                   + INSTALL,
        "download": ("if not SMOKE:\n"
                     "    import shutil\n"
                     "    shutil.copy(GGUF, '/kaggle/working/')  # appears under the notebook's Output tab\n"
                     "    shutil.copy(GGUF.parent / 'Modelfile', '/kaggle/working/')"),
    },
}


def cells(platform: str) -> list:
    p = PLATFORM[platform]
    return [
        new_markdown_cell(f"# qmd_unsloth on {p['title']}: train QMD's query-expansion model\n\n"
                          "Fine-tunes Qwen3-1.7B (4-bit QLoRA with Unsloth) to expand a search query into `hyde:`, "
                          "`lex:` and `vec:` lines, then exports a Q4_K_M GGUF for QMD, llama.cpp or Ollama. "
                          "Run the cells in order; each step says what it does."),
        new_markdown_cell("**Parameters.** `SMOKE=True` runs the whole notebook on CPU with a tiny offline model "
                          "(the project's tests do this); leave it `False` for a real run. Set `HF_REPO` to push "
                          "the result to the Hugging Face hub (needs `HF_TOKEN` in the notebook's secrets). `REPO_URL` is the git URL "
                          "of the qmd_unsloth repository to clone."),
        new_code_cell("SMOKE = False\nHF_REPO = ''\nREPO_URL = ''  # git URL of your qmd_unsloth copy (fork or mirror)",
                      metadata={"tags": ["parameters"]}),
        new_markdown_cell("**Set-up.** Where outputs go, and a helper that runs a command and stops on failure."),
        new_code_cell(p["first"] + "\n"
                      "import subprocess, sys\n"
                      "from pathlib import Path\n\n"
                      "def run(cmd):\n"
                      "    print('$', ' '.join(map(str, cmd)), flush=True)\n"
                      "    subprocess.run(list(map(str, cmd)), check=True)\n\n"
                      "if SMOKE:\n"
                      "    import tempfile\n"
                      "    WORK = tempfile.mkdtemp(prefix='qmd-smoke-')\n"
                      "    os.environ.update(HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1', HF_DATASETS_OFFLINE='1')\n"
                      "WORK = Path(WORK)\nWORK.mkdir(parents=True, exist_ok=True)\nprint('outputs in', WORK)"),
        new_markdown_cell("**Install.** Unsloth the way its docs recommend for this platform, then this project "
                          "and the pinned llama.cpp tools used for the GGUF export (skipped in smoke mode, where "
                          "the project is already installed)."),
        new_code_cell("if not SMOKE:\n    assert REPO_URL, 'set REPO_URL in the parameters cell'\n"
                      + "\n".join("    " + l for l in p["install"].splitlines())),
        new_markdown_cell("**GPU and config.** Detects the GPU and picks the preset by its memory (T4: 16 GB, fp16; "
                          "the trainer picks bf16 only where the GPU supports it)."),
        new_code_cell("import torch\n"
                      "if SMOKE:\n"
                      "    from qmd_unsloth.tiny import build\n"
                      "    BASE = build(WORK / 'tiny-qwen3')\n"
                      "    SFT = ['--config', 'configs/smoke/sft.yaml', '--base-model', BASE]\n"
                      "    GRPO = ['--config', 'configs/smoke/grpo.yaml']\n"
                      "    EVAL = ['--samples', '1', '--max-new-tokens', '48']\n"
                      "else:\n"
                      "    assert torch.cuda.is_available(), 'no GPU: switch the runtime to a GPU (T4 or better)'\n"
                      "    name = torch.cuda.get_device_name(0)\n"
                      "    gb = torch.cuda.get_device_properties(0).total_memory / 2**30\n"
                      "    preset = '24gb' if gb >= 22 else '16gb' if gb >= 15 else '12gb'\n"
                      "    print(f'{name}: {gb:.0f} GB, bf16={torch.cuda.is_bf16_supported()}, preset {preset}')\n"
                      "    SFT = ['--config', f'configs/presets/sft-{preset}.yaml']\n"
                      "    GRPO = ['--config', f'configs/presets/grpo-{preset}.yaml']\n"
                      "    EVAL = ['--samples', '3']"),
        new_markdown_cell("**Prepare the data.** Validates the shipped `data/*.jsonl` and writes the train/val split."),
        new_code_cell("run([sys.executable, '-m', 'qmd_unsloth.data', 'validate', 'data'])\n"
                      "run([sys.executable, '-m', 'qmd_unsloth.data', 'prepare', '--out', WORK / 'prepared'])"),
        new_markdown_cell("**SFT.** LoRA r16 on all projections, loss on the answer only. A disconnected runtime "
                          "can continue with the same command plus `--resume`."),
        new_code_cell("run([sys.executable, '-m', 'qmd_unsloth.sft', *SFT, '--output-dir', WORK, '--run-name', 'main'])"),
        new_markdown_cell("**GRPO.** A small new LoRA on the merged SFT model, rewarded by the shared reward "
                          "(KL beta 0.04 keeps it close to SFT)."),
        new_code_cell("run([sys.executable, '-m', 'qmd_unsloth.grpo', *GRPO, '--sft-model', WORK / 'sft/main/merged',\n"
                      "     '--output-dir', WORK, '--run-name', 'main'])"),
        new_markdown_cell("**Export.** A Q4_K_M GGUF with an Ollama `Modelfile`, checked in llama.cpp with the "
                          "prompt QMD sends; it is reported `verified` when its test generation under QMD's grammar "
                          "also parses (`export.json` lists each check)."),
        new_code_cell("run([sys.executable, '-m', 'qmd_unsloth.export', '--model', WORK / 'grpo/main', '--out', WORK / 'gguf'])\n"
                      "GGUF = WORK / 'gguf' / 'qmd-query-expansion-q4_k_m.gguf'\nassert GGUF.is_file()"),
        new_markdown_cell("**Eval.** The GGUF sampled the way QMD runs it (QMD's prompt, grammar and sampling), "
                          "scored by the shared reward."),
        new_code_cell("run([sys.executable, '-m', 'qmd_unsloth.eval', '--model', GGUF, '--out', WORK / 'eval', *EVAL])\n"
                      "print((WORK / 'eval' / 'report.md').read_text())"),
        new_markdown_cell("**Download or push.** Keep the GGUF, or push it with its model card (refused when the "
                          "eval score is below the one already on the hub)."),
        new_code_cell(p["download"] + "\n"
                      "if HF_REPO and not SMOKE:\n"
                      "    run([sys.executable, '-m', 'qmd_unsloth.hub', 'push', '--run', WORK / 'gguf', '--repo', HF_REPO,\n"
                      "         '--eval', WORK / 'eval' / 'report.json'])\n"
                      "print('GGUF:', GGUF)"),
    ]


def main() -> None:
    for platform in PLATFORM:
        nb = new_notebook(cells=cells(platform), metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "accelerator": "GPU", "language_info": {"name": "python"}})
        for i, cell in enumerate(nb.cells):
            cell.id = f"{platform}-{i:02d}"  # stable ids: regenerating changes nothing but edits
        out = REPO / "notebooks" / f"{platform}_qmd_unsloth.ipynb"
        out.parent.mkdir(exist_ok=True)
        nbformat.write(nb, out)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
