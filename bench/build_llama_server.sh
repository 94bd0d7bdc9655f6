#!/usr/bin/env bash
# Build llama.cpp's own `llama-server` (continuous batching) from the llama.cpp sources vendored in
# the llama-cpp-python sdist on PyPI: Debian 12 ships no llama.cpp package. Reproducible: a pinned
# sdist version, a plain CMake build of the one target, no downloads besides the sdist.
#
#   bash bench/build_llama_server.sh            # -> $EESERVE_LLAMA_DIR/bin/llama-server
#   EESERVE_LLAMA_SERVER=$EESERVE_LLAMA_DIR/bin/llama-server python -m bench.serving --peer llama-server
#
# Environment: LLAMA_CPP_PYTHON_VERSION (default 0.3.36), EESERVE_LLAMA_DIR (default
# ~/.cache/eeserve/llama), JOBS (default: the machine's cores). Needs cmake and a C++ compiler.
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
DIR="${EESERVE_LLAMA_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/eeserve/llama}"
JOBS="${JOBS:-$(nproc)}"
SDIST="$DIR/llama_cpp_python-$VERSION.tar.gz"
SRC="$DIR/llama_cpp_python-$VERSION/vendor/llama.cpp"
BIN="$DIR/bin/llama-server"

mkdir -p "$DIR/bin"
if [ -x "$BIN" ]; then
    echo "llama-server already built: $BIN"; exit 0
fi
if [ ! -f "$SDIST" ]; then
    python -m pip download --no-binary llama-cpp-python --no-deps \
        "llama-cpp-python==$VERSION" -d "$DIR"
fi
[ -d "$SRC" ] || tar -xzf "$SDIST" -C "$DIR"
cmake -S "$SRC" -B "$SRC/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=ON \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF
cmake --build "$SRC/build" --target llama-server -j"$JOBS"
cp "$SRC/build/bin/llama-server" "$BIN"
echo "built $BIN"
