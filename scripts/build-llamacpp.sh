#!/usr/bin/env bash
# Builds llama.cpp targets from the vendored tree of the llama-cpp-python sdist on PyPI (cmake
# from Debian), once per build folder, for the side-by-side benchmarks. Prints the source tree.
# usage: build-llamacpp.sh BUILD_DIR TARGET...   (llama-server among the targets turns the
# server build on; GGML_NATIVE=OFF in the environment builds for plain AVX2 + FMA + F16C
# instead of the host's own instruction set)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build=$1
shift
version=0.3.36
src="$root/.llama.cpp/llama_cpp_python-$version/vendor/llama.cpp"
# What the build folder was made from: another release, instruction set choice or (for a
# native build) another CPU means building again, not measuring the old binaries.
# (ARM kernels print no `model name`; their CPU flags say what a native build uses.)
cpu=$(grep -m1 -E '^(model name|Features|flags)' /proc/cpuinfo 2>/dev/null | cut -d: -f2 | xargs || true)
stamp="$version native=${GGML_NATIVE:-ON} $(uname -m) $cpu"
missing=0
for t in "$@"; do [ -x "$build/bin/$t" ] || missing=1; done
if [ -d "$build" ] && [ "$(cat "$build/.edgelm-stamp" 2>/dev/null || true)" != "$stamp" ]; then
  # CMake keeps the source and flags it was configured with: start the folder again.
  rm -rf "$build"
  missing=1
fi
if [ "$missing" = 1 ]; then
  if ! command -v cmake >/dev/null; then
    if [ "$(id -u)" = 0 ]; then
      apt-get update -qq && apt-get install -y -qq cmake >/dev/null
    else
      sudo apt-get update -qq && sudo apt-get install -y -qq cmake >/dev/null
    fi
  fi
  mkdir -p "$root/.llama.cpp"
  if [ ! -d "$src" ]; then
    # The project's JSON lists every release; a mirror may give URLs relative to it.
    index="https://pypi.org/pypi/llama-cpp-python/json"
    url=$(curl -fsSL "$index" | python3 -c 'import json, sys, urllib.parse
d = json.load(sys.stdin)
print(urllib.parse.urljoin(sys.argv[1], [u["url"] for u in d["releases"][sys.argv[2]] if u["packagetype"] == "sdist"][0]))' "$index" "$version")
    curl -fsSL "$url" | tar xz -C "$root/.llama.cpp"
  fi
  server=OFF
  case " $* " in *" llama-server "*) server=ON ;; esac
  cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE="${GGML_NATIVE:-ON}" -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=$server >/dev/null
  cmake --build "$build" --target "$@" -j "$(nproc)" >/dev/null
  echo "$stamp" > "$build/.edgelm-stamp"
fi
echo "$src"
