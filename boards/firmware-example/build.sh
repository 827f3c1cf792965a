#!/usr/bin/env bash
# Builds the example firmware for thumbv7em-none-eabihf and checks its flash footprint
# (text + data, as llvm-size counts them) against a 16 KiB budget.
#
# FEATURES=qemu builds the variant for QEMU's netduinoplus2 (semihosting report and exit
# status) into its own target folder, so it never replaces the default ELF; it only has to
# fit a 64 KiB sanity limit (core::fmt comes with it). The last line printed is `elf: PATH`.
set -euo pipefail
cd "$(dirname "$0")"

readonly TARGET=thumbv7em-none-eabihf
readonly FEATURES=${FEATURES:-}
if [ -z "$FEATURES" ]; then
    readonly TARGET_DIR=target LIMIT=16384
else
    readonly TARGET_DIR=target/features-${FEATURES//[ ,]/_} LIMIT=65536
fi
readonly ELF=$TARGET_DIR/$TARGET/release/edgelm-firmware-example

rustup target add "$TARGET" >/dev/null 2>&1 || rustup target add "$TARGET"
cargo build --release --target-dir "$TARGET_DIR" ${FEATURES:+--features "$FEATURES"}

# llvm-size: the system one, one on PATH, or the rustup llvm-tools component (installed if
# nothing else is found).
find_llvm_size() {
    local host sysroot
    for c in /usr/bin/llvm-size "$(command -v llvm-size || true)"; do
        if [ -n "$c" ] && [ -x "$c" ]; then echo "$c"; return 0; fi
    done
    host=$(rustc -vV | sed -n 's/^host: //p')
    sysroot=$(rustc --print sysroot)
    for c in "$sysroot/lib/rustlib/$host/bin/llvm-size" "$HOME"/.rustup/toolchains/*/lib/rustlib/"$host"/bin/llvm-size; do
        if [ -x "$c" ]; then echo "$c"; return 0; fi
    done
    return 1
}

if ! size_tool=$(find_llvm_size); then
    echo "no llvm-size found; installing the llvm-tools rustup component" >&2
    rustup component add llvm-tools >&2
    size_tool=$(find_llvm_size) || { echo "llvm-size still not found" >&2; exit 1; }
fi

echo "$size_tool $ELF"
"$size_tool" "$ELF"
read -r text data bss < <("$size_tool" "$ELF" | awk 'NR == 2 { print $1, $2, $3 }')
flash=$((text + data))
echo "flash (text+data): $flash bytes of $LIMIT; RAM statics (data+bss): $((data + bss)) bytes"
if [ "$flash" -ge "$LIMIT" ]; then
    echo "FAIL: text+data $flash >= $LIMIT bytes" >&2
    exit 1
fi
echo "elf: $PWD/$ELF"
