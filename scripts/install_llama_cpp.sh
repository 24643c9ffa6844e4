#!/usr/bin/env bash
# Installs llama-cpp-python (export and GGUF verification) from a wheel cached on this machine, building it once from
# the registry's source distribution (~10-15 min on 2 cores), then prepares the pinned llama.cpp tools folder.
# Usage: bash scripts/install_llama_cpp.sh        (uses the active python)
set -euo pipefail
VERSION=0.3.36
CACHE=${QMD_UNSLOTH_CACHE:-$HOME/.cache/qmd_unsloth}
mkdir -p "$CACHE/wheels" "$CACHE/sdist"
SDIST="$CACHE/sdist/llama_cpp_python-$VERSION.tar.gz"
[ -f "$SDIST" ] || python -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$CACHE/sdist"
WHEEL=$(ls "$CACHE"/wheels/llama_cpp_python-$VERSION-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$WHEEL" ]; then
  echo "building llama-cpp-python $VERSION (once per machine; cached in $CACHE/wheels)"
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) python -m pip wheel -q --no-deps -w "$CACHE/wheels" "$SDIST"
  WHEEL=$(ls "$CACHE"/wheels/llama_cpp_python-$VERSION-*.whl | head -n 1)
fi
python -m pip install -q "$WHEEL" sentencepiece
python -m qmd_unsloth.llamacpp prepare --sdist "$SDIST"
