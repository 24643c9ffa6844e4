"""Hub: push a GGUF, merged model or adapter with a model card holding the eval table and the training config.

    python -m qmd_unsloth.hub push --run DIR --repo USER/NAME [--what gguf|merged|adapter] [--eval REPORT.json]
        [--force] [--private] [--card-only]

Refuses to push when the new eval mean score is below the one recorded in the repo's current card, unless
``--force``.  The token comes from ``HF_TOKEN`` or a ``hf auth login``; it is never printed or written by us.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from .cli import UserError, command

SCORE_MARK = re.compile(r"<!-- qmd_unsloth:eval_mean_score=([0-9.]+) -->")


class HubError(UserError, RuntimeError):
    """A user-facing hub problem (one line)."""


def find_eval(run: Path, explicit: str | None) -> dict | None:
    """The eval report: --eval, or report.json in the run folder or its eval/ subfolder."""
    for p in ([Path(explicit)] if explicit else [run / "report.json", run / "eval" / "report.json"]):
        if p.is_file():
            try:
                data = json.loads(p.read_text(encoding="utf-8"))
                data = data["models"][0] if "models" in data else data
                float(data["mean_score"])
            except (ValueError, KeyError, IndexError, TypeError) as e:
                raise HubError(f"{p}: not an eval report.json of python -m qmd_unsloth.eval "
                               f"({type(e).__name__}: {' '.join(str(e).split())[:80]})") from None
            return data
        if explicit:
            raise HubError(f"{p}: eval report not found")
    return None


def render_card(run: Path, repo: str, what: str, report: dict | None) -> str:
    """The model card: YAML front matter, how to use, the eval table, the resolved training config."""
    from .eval import markdown

    config_file = run / "config.yaml"
    if not config_file.is_file() and (run / "export.json").is_file():  # an export folder: the run it came from
        try:
            config_file = Path(json.loads((run / "export.json").read_text())["source"]).parent / "config.yaml"
        except (ValueError, KeyError, TypeError):
            raise HubError(f"{run / 'export.json'}: not an export.json of python -m qmd_unsloth.export") from None
    config = config_file.read_text() if config_file.is_file() else "(no config.yaml in the run)"
    base = "Qwen/Qwen3-1.7B"
    m = re.search(r"^(?:base_model|sft_model): (.+)$", config, re.M)
    if m and "/" in m.group(1) and not m.group(1).startswith(("runs/", "/", ".")):
        base = m.group(1).strip()
    lines = ["---", "license: apache-2.0", f"base_model: {base}", "library_name: transformers" if what != "gguf"
             else "library_name: gguf", "tags: [qmd, query-expansion, unsloth, qlora, grpo]", "---", "",
             f"# {repo.split('/')[-1]}", "",
             "Query expansion for [QMD](https://github.com/tobi/qmd): a raw search query becomes one `hyde:` passage, "
             "`lex:` keyword lines and `vec:` natural-language lines. Trained with qmd_unsloth (SFT, then GRPO "
             "against the shared reward).", "",
             "Prompt: the Qwen3 chat template, one user turn `/no_think Expand this search query: {query}`, thinking "
             "disabled; QMD samples at temperature 0.7, top-k 20, top-p 0.8.", "", "## Evaluation", ""]
    if report:
        lines += [markdown([report]), f"<!-- qmd_unsloth:eval_mean_score={report['mean_score']:.4f} -->", ""]
    else:
        lines += ["No eval report was given.", ""]
    lines += ["## Training config", "", "```yaml", config.rstrip(), "```", ""]
    return "\n".join(lines)


def current_score(api, repo: str) -> float | None:
    """The eval mean score recorded in the repo's current card, or None (no repo, no card, no score)."""
    from huggingface_hub.errors import LocalEntryNotFoundError
    from huggingface_hub.utils import EntryNotFoundError, RepositoryNotFoundError

    try:
        path = api.hf_hub_download(repo_id=repo, filename="README.md")
    except LocalEntryNotFoundError as e:  # the hub did not answer (and no cached copy): never skip the score gate
        raise HubError(f"{repo}: cannot reach the hub to read the current model card (network, proxy or "
                       f"HF_ENDPOINT); try again when it is reachable") from e
    except (RepositoryNotFoundError, EntryNotFoundError):
        return None
    m = SCORE_MARK.search(Path(path).read_text(encoding="utf-8"))
    return float(m.group(1)) if m else None


def files_to_push(run: Path, what: str) -> tuple[Path, list[str] | None]:
    """(folder to upload, allow patterns)."""
    if what == "gguf":
        folder = run if list(run.glob("*.gguf")) else run / "gguf"
        if not list(folder.glob("*.gguf")):
            raise HubError(f"{run}: no .gguf file (export first: python -m qmd_unsloth.export)")
        return folder, ["*.gguf", "Modelfile"]
    if what == "merged":
        folder = run / "merged" if (run / "merged").is_dir() else run
        if not (folder / "config.json").is_file():
            raise HubError(f"{run}: no merged model (merged/config.json)")
        return folder, None
    ckpts = sorted((p for p in (run / "checkpoints").glob("checkpoint-*") if p.name.split("-")[-1].isdigit()
                    and (p / "trainer_state.json").is_file()),  # complete ones only: the Trainer writes it last
                   key=lambda p: int(p.name.split("-")[-1]))
    folder = ckpts[-1] if ckpts else run
    if not (folder / "adapter_config.json").is_file():
        raise HubError(f"{run}: no LoRA adapter (adapter_config.json)")
    return folder, ["adapter_*", "*.json", "*.jinja", "*.txt"]


def push(run: Path, repo: str, what: str = "gguf", eval_path: str | None = None, force: bool = False,
         private: bool = False, card_only: bool = False, api=None) -> dict:
    from huggingface_hub import HfApi, get_token

    run = Path(run)
    if not run.is_dir():
        raise HubError(f"{run}: run folder not found")
    report = find_eval(run, eval_path)
    folder, patterns = files_to_push(run, what)
    if api is None:
        if not get_token():
            raise HubError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")
        api = HfApi()
    try:
        old = current_score(api, repo)
    except HubError:
        raise
    except Exception as e:  # network or auth failure inside huggingface_hub: one line, never the token
        raise HubError(f"{repo}: cannot read the current model card ({type(e).__name__})") from None
    new = report["mean_score"] if report else None
    if old is not None and not force and (new is None or new < old):
        shown = "no eval report" if new is None else f"{new:.4f}"
        raise HubError(f"{repo}: new eval score ({shown}) is below the current card's {old:.4f}; "
                       "push anyway with --force")
    card = render_card(run, repo, what, report)
    try:
        api.create_repo(repo_id=repo, private=private, exist_ok=True)
        if not card_only:
            api.upload_folder(repo_id=repo, folder_path=str(folder), allow_patterns=patterns,
                              ignore_patterns=[".*", "*/.*"],  # temporaries of a running or killed export
                              commit_message=f"qmd_unsloth: {what} from {run.name}")
        api.upload_file(repo_id=repo, path_or_fileobj=card.encode(), path_in_repo="README.md",
                        commit_message="qmd_unsloth: model card")
    except Exception as e:  # as above: report the failure, never the token
        raise HubError(f"{repo}: upload failed ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    return {"repo": repo, "what": what, "folder": str(folder), "previous_score": old, "score": new}


@command("hub")
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qmd_unsloth.hub", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("push", help="upload with a model card, gated on the eval score")
    p.add_argument("--run", required=True, help="run folder (or export folder for --what gguf)")
    p.add_argument("--repo", required=True, help="USER/NAME on the hub")
    p.add_argument("--what", choices=["gguf", "merged", "adapter"], default="gguf")
    p.add_argument("--eval", help="eval report.json (default: report.json in the run folder or its eval/)")
    p.add_argument("--force", action="store_true", help="push even when the eval score went down")
    p.add_argument("--private", action="store_true")
    p.add_argument("--card-only", action="store_true", help="update only the model card")
    c = sub.add_parser("card", help="print the model card that push would upload")
    c.add_argument("--run", required=True)
    c.add_argument("--repo", default="USER/qmd-query-expansion")
    c.add_argument("--what", choices=["gguf", "merged", "adapter"], default="gguf")
    c.add_argument("--eval")
    args = ap.parse_args(argv)
    try:
        if not Path(args.run).is_dir():
            raise HubError(f"{args.run}: run folder not found")
        if args.cmd == "card":
            print(render_card(Path(args.run), args.repo, args.what, find_eval(Path(args.run), args.eval)))
            return 0
        r = push(Path(args.run), args.repo, args.what, args.eval, args.force, args.private, args.card_only)
    except HubError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"hub: pushed {r['what']} from {r['folder']} to {r['repo']} (eval score {r['score']}, "
          f"previous {r['previous_score']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
