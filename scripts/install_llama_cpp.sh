#!/usr/bin/env bash
# Installs llama-cpp-python (export and GGUF verification) from a wheel cached on this machine, building it once from
# the registry's source distribution (~10-15 min on 2 cores), then prepares the pinned llama.cpp tools folder.
# Usage: bash scripts/install_llama_cpp.sh              (uses the active python)
#        bash scripts/install_llama_cpp.sh --prebuilt   (online notebooks: first try llama-cpp-python's own pre-built
#            CPU wheel index, https://abetlen.github.io/llama-cpp-python/whl/cpu, so nothing compiles; falls back
#            to the build when it has no wheel of this version for this Python)
set -euo pipefail
VERSION=0.3.36
PREBUILT_INDEX=https://abetlen.github.io/llama-cpp-python/whl/cpu
CACHE=${QMD_UNSLOTH_CACHE:-$HOME/.cache/qmd_unsloth}
mkdir -p "$CACHE/wheels" "$CACHE/sdist"
SDIST="$CACHE/sdist/llama_cpp_python-$VERSION.tar.gz"
# the source distribution also supplies the converter for the tools folder (a download, no build)
[ -f "$SDIST" ] || python -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$CACHE/sdist"
if [ "${1:-}" = "--prebuilt" ] && ! python -c "import llama_cpp" >/dev/null 2>&1; then
  python -m pip install -q --only-binary=:all: --extra-index-url "$PREBUILT_INDEX" "llama-cpp-python==$VERSION" \
    && echo "llama-cpp-python $VERSION: pre-built wheel installed (no compile)" \
    || echo "llama-cpp-python $VERSION: no pre-built wheel for this Python; building from source"
fi
if ! python -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" >/dev/null 2>&1; then
  WHEEL=$(ls "$CACHE"/wheels/llama_cpp_python-$VERSION-*.whl 2>/dev/null | head -n 1 || true)
  if [ -z "$WHEEL" ]; then
    echo "building llama-cpp-python $VERSION (once per machine; cached in $CACHE/wheels)"
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
      CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) python -m pip wheel -q --no-deps -w "$CACHE/wheels" "$SDIST"
    WHEEL=$(ls "$CACHE"/wheels/llama_cpp_python-$VERSION-*.whl | head -n 1)
  fi
  python -m pip install -q "$WHEEL"
fi
python -m pip install -q sentencepiece
python -m qmd_unsloth.llamacpp prepare --sdist "$SDIST"
