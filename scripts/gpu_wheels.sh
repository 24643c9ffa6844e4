#!/usr/bin/env bash
# Downloads, on a machine with the package registry, exactly the Python 3.12 wheels the GPU check needs on a GPU
# machine that has no network (one H100/H200, Python 3.12, torch 2.11 + CUDA 13, transformers 5.17, peft, accelerate
# already there; /work/shared/ENVIRONMENT.md "The GPU test machine"), into .whl/ (gitignored), small enough to be
# carried with the working tree (64 MiB in all):
#   - unsloth without its bundled `studio` web UI (27 MiB -> ~7 MiB), repacked;
#   - bitsandbytes with only its CUDA 13 library (torch 2.11+cu130), repacked;
#   - llama-cpp-python (source-only on the registry) as the wheel built here, without its unloaded copies;
#   - llama.cpp's converter sources (the part of llama-cpp-python's sdist that prepare() takes).
# Usage: bash scripts/gpu_wheels.sh [DIR]     (default .whl; then: bash scripts/gpu_check.sh OUT_DIR on the GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
PY=${PYTHON:-python3}
CACHE=${QMD_UNSLOTH_CACHE:-$HOME/.cache/qmd_unsloth}
mkdir -p "$DIR"
DL=(-m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DIR")
# Versions that resolved together for that machine (ENVIRONMENT.md); pure-Python ones first.
"$PY" "${DL[@]}" unsloth==2026.10.9 unsloth_zoo==2026.10.9 trl==1.15.0 datasets==4.8.5 torchao==0.18.0 \
  cut_cross_entropy==25.1.1 msgspec==0.22.0 tyro==1.0.17 dill==0.4.1 multiprocess==0.70.19 docstring_parser==0.18.0 \
  typeguard==4.6.1 fsspec==2026.2.0 bitsandbytes==0.50.2 \
  pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 annotated-types==0.8.0 typing-inspection==0.4.5 python-dotenv==1.2.4

"$PY" - "$DIR" <<'EOF'
"""Repack two wheels without what the GPU check never loads (a wheel is a zip; RECORD lists its files)."""
import csv, io, sys, zipfile
from pathlib import Path

def repack(path, drop):
    src = zipfile.ZipFile(path)
    names = [n for n in src.namelist() if not drop(n)]
    out = path.with_suffix(".tmp")
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for n in names:
            data = src.read(n)
            if n.endswith(".dist-info/RECORD"):
                rows = [r for r in csv.reader(io.StringIO(data.decode())) if r and not drop(r[0])]
                buf = io.StringIO(); csv.writer(buf, lineterminator="\n").writerows(rows); data = buf.getvalue().encode()
            dst.writestr(src.getinfo(n), data)
    out.replace(path)
    print(f"repacked {path.name}: {path.stat().st_size / 2**20:.1f} MiB")

d = Path(sys.argv[1])
for w in d.glob("unsloth-2026*.whl"):
    repack(w, lambda n: n.startswith("studio/") or "/studio/" in n)
for w in d.glob("bitsandbytes-*.whl"):
    # keep the CPU library and the CUDA 13.0 build torch 2.11+cu130 loads (no ROCm, XPU or other CUDA builds)
    repack(w, lambda n: "libbitsandbytes_" in n and not n.endswith(("_cpu.so", "_cuda130.so")))
EOF

# llama-cpp-python: the wheel scripts/install_llama_cpp.sh built (py3-none: one wheel for every Python 3), stripped.
WHEEL=$(ls "$CACHE"/wheels/llama_cpp_python-0.3.36-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$WHEEL" ]; then
  echo "error: no llama-cpp-python wheel in $CACHE/wheels; run bash scripts/install_llama_cpp.sh first" >&2; exit 1
fi
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
(cd "$TMP" && unzip -q "$WHEEL" && find . -name '*.so*' -type f -exec strip --strip-unneeded {} + 2>/dev/null || true

 # llama_cpp loads llama_cpp/lib/lib{llama,ggml,mtmd}.so, which find their needs by soname (.so.0, RUNPATH $ORIGIN):
 # the fully versioned copies and the top-level lib/, include/, bin/ copies are never loaded
 rm -rf lib include bin llama_cpp/include llama_cpp/bin; find llama_cpp/lib -name '*.so.0.*' -delete)
"$PY" - "$TMP" "$DIR/$(basename "$WHEEL")" <<'EOF'
import base64, csv, hashlib, io, os, sys, zipfile
from pathlib import Path
root, out = Path(sys.argv[1]), Path(sys.argv[2])
files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name == "RECORD")
record = next(root.glob("*.dist-info")) / "RECORD"
rows = []
with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
    for p in files:
        rel = p.relative_to(root).as_posix(); data = p.read_bytes()
        z.write(p, rel)
        rows.append([rel, "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode(), str(len(data))])
    rows.append([record.relative_to(root).as_posix(), "", ""])
    buf = io.StringIO(); csv.writer(buf, lineterminator="\n").writerows(rows)
    z.writestr(record.relative_to(root).as_posix(), buf.getvalue())
print(f"stripped {out.name}: {out.stat().st_size / 2**20:.1f} MiB")
EOF
# llama.cpp's converter sources for `python -m qmd_unsloth.llamacpp prepare --sdist` on that machine: the 77 MB source
# distribution cut down to the members prepare() takes (same names and layout).
SDIST="$CACHE/sdist/llama_cpp_python-0.3.36.tar.gz"
[ -f "$SDIST" ] || "$PY" -m pip download -q --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d "$CACHE/sdist"
"$PY" - "$SDIST" "$DIR/llama_cpp_python-0.3.36.tar.gz" <<'EOF'
import sys, tarfile
prefix = "llama_cpp_python-0.3.36/vendor/llama.cpp/"
with tarfile.open(sys.argv[1]) as src, tarfile.open(sys.argv[2], "w:gz") as dst:
    for m in src.getmembers():
        rest = m.name[len(prefix):] if m.name.startswith(prefix) else None
        if rest is not None and (rest == "convert_hf_to_gguf.py" or rest.startswith(("conversion/", "gguf-py/"))):
            dst.addfile(m, src.extractfile(m) if m.isfile() else None)
EOF
du -ch "$DIR"/* | tail -n 1
