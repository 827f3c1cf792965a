# Sourced by the benchmark recipes. `fresh DIR [INPUT...]` is true when the bundle in DIR was
# written after this build's edgelm-distill and after each INPUT (a file; for a bundle folder
# its edgelm.json, for a checkpoint folder its config.json and weight files): a recipe remakes
# a bundle that a newer tool or newer source would make differently, instead of measuring the
# old one under a new run's name.
fresh() {
  local made="$1/edgelm.json" tool="${EDGELM_DISTILL:-target/release/edgelm-distill}" input f
  shift
  [ -f "$made" ] && [ "$made" -nt "$tool" ] || return 1
  for input in "$@"; do
    if [ -f "$input/edgelm.json" ]; then
      [ "$made" -nt "$input/edgelm.json" ] || return 1
    elif [ -d "$input" ]; then
      for f in "$input"/config.json "$input"/*.safetensors; do
        [ ! -e "$f" ] || [ "$made" -nt "$f" ] || return 1
      done
    else
      [ "$made" -nt "$input" ] || return 1
    fi
  done
}
