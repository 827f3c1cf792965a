#!/usr/bin/env bash
# Cross-builds the device side of edgelm for a board and lays out its deploy tree.
# Usage: scripts/build-board.sh boards/NAME.toml [HOST_EDGELM]
#
# The profile is read through `edgelm board --get` (one parser for profiles): the Rust target,
# the ONNX Runtime source and the install prefix. Builds `edgelm` (profile `board`) and `libedgelm.so`
# (`board-lib`), both release optimised for size, for the target, fetches the board's ONNX
# Runtime library when it comes from the PyPI wheel, and writes
# out/boards/NAME/<install_prefix>/{bin,lib,include,share/edgelm}. Prints the stripped sizes.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
if [ $# -lt 1 ] || [ $# -gt 2 ]; then
  echo "usage: $0 boards/NAME.toml [HOST_EDGELM]" >&2
  exit 2
fi
profile="$(realpath "$1")"
cd "$root"
target_dir="${CARGO_TARGET_DIR:-$root/target}"
host_edgelm="${2:-$target_dir/debug/edgelm}"
get() { "$host_edgelm" --board "$profile" board --get "$1"; }
id="$(get id)"
target="$(get target)"
arch="$(get arch)"
prefix="$(get install_prefix)"
source="$(get ort.source)"

rustup target list --installed 2>/dev/null | grep -qx "$target" || rustup target add "$target"
host_target="$(rustc -vV | sed -n 's/^host: //p')"
strip_tool=strip
if [ "$target" != "$host_target" ]; then
  # Debian's cross toolchain (gcc-<arch>-linux-gnu) links and strips for the board.
  gnu="${arch}-linux-gnu"
  if ! command -v "$gnu-gcc" >/dev/null 2>&1; then
    echo "build-board: $gnu-gcc not found; install it (Debian/Ubuntu: apt install gcc-${arch//_/-}-linux-gnu)" >&2
    exit 1
  fi
  # .cargo/config.toml names the linker for aarch64 already; this covers any other target.
  var="CARGO_TARGET_$(echo "$target" | tr 'a-z-' 'A-Z_')_LINKER"
  export "$var=$gnu-gcc"
  strip_tool="$gnu-strip"
fi
# Built for the C API level of the board's library (`edgelm board` checked it is one we know).
api="$(get ort.api)"
# Two profiles: the binary aborts on a panic (smaller), the C library unwinds (its ABI catches
# panics).
# EDGELM_FEATURES adds features of the binary, e.g. EDGELM_FEATURES=http for `serve --http`
# (left out by default: axum and tokio add about 1 MB).
features=(--no-default-features --features "edgelm-runtime/ort-api-$api")
cargo build --profile board --target "$target" -p edgelm-cli --no-default-features \
  --features "edgelm-runtime/ort-api-$api${EDGELM_FEATURES:+,$EDGELM_FEATURES}"
cargo build --profile board-lib --target "$target" -p edgelm-capi "${features[@]}"

tree="$root/out/boards/$id"
dest="$tree${prefix}"
rm -rf "$tree"
mkdir -p "$dest/bin" "$dest/lib" "$dest/include" "$dest/share/edgelm"
cp "$target_dir/$target/board/edgelm" "$dest/bin/edgelm"
cp "$target_dir/$target/board-lib/libedgelm.so" "$dest/lib/libedgelm.so"
"$strip_tool" "$dest/bin/edgelm" "$dest/lib/libedgelm.so"
cp "$root/include/edgelm.h" "$dest/include/"
cp "$profile" "$dest/share/edgelm/board.toml"
case "$source" in
  pypi-wheel)
    "$root/scripts/setup-ort.sh" "$arch" "$(get ort.platform)"
    version="$(tr -d '[:space:]' < "$root/ort-version.txt")"
    cp "$root/.ort/linux-$arch/libonnxruntime.so.$version" "$dest/lib/"
    ln -sf "libonnxruntime.so.$version" "$dest/lib/libonnxruntime.so"
    ort_note="lib/libonnxruntime.so.$version (from the onnxruntime $version wheel)"
    ;;
  system)
    # The board's own library, found through lib/ like a shipped one (the link dangles here).
    ort_path="$(get ort.path)"
    ln -sfn "$ort_path" "$dest/lib/libonnxruntime.so"
    ort_note="lib/libonnxruntime.so -> $ort_path (the board's own)"
    ;;
  *)
    echo "build-board: unknown ort.source '$source'" >&2
    exit 1
    ;;
esac
size() { stat -c %s "$1"; }
echo "build-board: $id ($target) -> $dest"
echo "  bin/edgelm       $(size "$dest/bin/edgelm") bytes stripped"
echo "  lib/libedgelm.so $(size "$dest/lib/libedgelm.so") bytes stripped"
echo "  ONNX Runtime     $ort_note"
