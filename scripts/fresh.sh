# Sourced by the benchmark recipes. `fresh DIR [INPUT...]` is true when the bundle in DIR was
# written after this build's edgelm-distill and after each INPUT (a file; for a folder its
# edgelm.json, else its config.json): a recipe remakes a bundle that a newer tool or newer
# source would make differently, instead of measuring the old one under a new run's name.
fresh() {
  local made="$1/edgelm.json" tool="${EDGELM_DISTILL:-target/release/edgelm-distill}" input
  shift
  [ -f "$made" ] && [ "$made" -nt "$tool" ] || return 1
  for input in "$@"; do
    if [ -d "$input" ]; then
      if [ -f "$input/edgelm.json" ]; then input="$input/edgelm.json"; else input="$input/config.json"; fi
    fi
    [ "$made" -nt "$input" ] || return 1
  done
}
