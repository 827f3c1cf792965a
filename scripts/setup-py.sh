#!/usr/bin/env bash
# Creates .venv with the pinned Python packages for tests and benchmarks. Idempotent: a stamp
# file records the requirements it was made from.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
req="$root/scripts/requirements.txt"
stamp="$root/.venv/.requirements"
if [ -f "$stamp" ] && cmp -s "$req" "$stamp"; then
  exit 0
fi
python3 -m venv "$root/.venv"
"$root/.venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req"
cp "$req" "$stamp"
echo "setup-py: .venv ready"
