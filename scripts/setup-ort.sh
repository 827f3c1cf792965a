#!/usr/bin/env bash
# Puts libonnxruntime.so.<version> (version from ort-version.txt) into .ort/linux-<arch>/,
# taken from the onnxruntime wheel on PyPI, and links .ort/host to this machine's folder.
# Idempotent: downloads nothing when the library is there.
# Usage: scripts/setup-ort.sh [arch [platform [version]]]   (arch: x86_64 (default: this
# machine) or aarch64; platform: the wheel's platform tag, as a board profile's ort.platform
# names it, "" for the default; version: default the pinned one)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
pinned="$(tr -d '[:space:]' < "$root/ort-version.txt")"
arch="${1:-$(uname -m)}"
# A third argument fetches another release beside the pinned one (the tests' oldest library);
# only the pinned one gets the unversioned libonnxruntime.so link and .ort/host.
version="${3:-$pinned}"
dest="$root/.ort/linux-$arch"
lib="$dest/libonnxruntime.so.$version"
# .ort/host points at this machine's folder; .cargo/config.toml and the justfile hand it to
# the binaries through EDGELM_ORT_LIB.
link_host() {
  if [ "$arch" = "$(uname -m)" ] && [ "$version" = "$pinned" ]; then
    ln -sfn "linux-$arch" "$root/.ort/host"
  fi
}
case "$arch" in
  x86_64) platform="${2:-manylinux_2_27_x86_64}" ;;
  aarch64) platform="${2:-manylinux_2_27_aarch64}" ;;
  *) echo "setup-ort: no onnxruntime wheel for architecture $arch" >&2; exit 1 ;;
esac
# The platform tag the library came for sits beside it: a board asking for another tag gets
# its own wheel's library instead of the cached one.
if [ -f "$lib" ] && [ "$(cat "$lib.platform" 2>/dev/null || echo "$platform")" = "$platform" ]; then
  link_host
  exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 \
  --platform "$platform" --platform "${platform/2_27/2_28}" --platform "${platform/2_27/2_17}" \
  -d "$tmp" "onnxruntime==$version"
wheel="$(ls "$tmp"/onnxruntime-*.whl)"
python3 - "$wheel" "$tmp/x" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    for n in z.namelist():
        if "/capi/libonnxruntime.so" in n:
            z.extract(n, sys.argv[2])
PY
mkdir -p "$dest"
found="$(find "$tmp/x" -name "libonnxruntime.so.$version" | head -n1)"
if [ -z "$found" ]; then
  echo "setup-ort: the onnxruntime $version wheel has no libonnxruntime.so.$version" >&2
  exit 1
fi
cp "$found" "$lib.part" && mv "$lib.part" "$lib"
echo "$platform" > "$lib.platform"
if [ "$version" = "$pinned" ]; then
  ln -sf "libonnxruntime.so.$version" "$dest/libonnxruntime.so"
fi
link_host
echo "setup-ort: installed $lib"
