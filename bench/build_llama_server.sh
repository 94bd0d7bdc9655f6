#!/usr/bin/env bash
# Build llama.cpp's own `llama-server` (continuous batching) and its shared libraries from the
# llama.cpp sources vendored in the llama-cpp-python sdist on PyPI (Debian 12 ships no llama.cpp
# package), then install llama-cpp-python on those libraries (no second compilation). Reproducible:
# a pinned sdist version, a plain CMake build of two targets, no downloads besides the sdist.
#
#   bash bench/build_llama_server.sh            # -> $EESERVE_LLAMA_DIR/build/bin/llama-server (+ lib*.so)
#   export LLAMA_CPP_LIB_PATH=$EESERVE_LLAMA_DIR/build/bin
#   python -m bench.serving --peer llama-server   # and bench.speed's llama-cpp-python batch-1 peer
#
# About 20 minutes on 2 cores (both targets share one build of ggml and libllama).
# Environment: LLAMA_CPP_PYTHON_VERSION (default 0.3.36), EESERVE_LLAMA_DIR (default
# ~/.cache/eeserve/llama), JOBS (default: the machine's cores), NO_PYTHON=1 (skip installing
# llama-cpp-python). Needs cmake and a C++ compiler.
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
DIR="${EESERVE_LLAMA_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/eeserve/llama}"
JOBS="${JOBS:-$(nproc)}"
SDIST="$DIR/llama_cpp_python-$VERSION.tar.gz"
SRC="$DIR/llama_cpp_python-$VERSION/vendor/llama.cpp"
BUILD="$DIR/build"
BIN="$BUILD/bin"  # the server and the shared libraries it and llama-cpp-python load

mkdir -p "$DIR"
if [ ! -f "$SDIST" ]; then
    python -m pip download --no-binary llama-cpp-python --no-deps \
        "llama-cpp-python==$VERSION" -d "$DIR"
fi
[ -d "$SRC" ] || tar -xzf "$SDIST" -C "$DIR"
if [ ! -x "$BIN/llama-server" ]; then
    cmake -S "$SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=ON \
        -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=ON
    cmake --build "$BUILD" --target llama-server llama -j"$JOBS"
fi
echo "built $BIN/llama-server"
if [ -z "${NO_PYTHON:-}" ]; then
    # the Python bindings without building llama.cpp again: they load $LLAMA_CPP_LIB_PATH/libllama.so
    CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF -DMTMD_BUILD=OFF" python -m pip install "$SDIST[server]"
    echo "installed llama-cpp-python $VERSION; run with LLAMA_CPP_LIB_PATH=$BIN"
fi
