#!/usr/bin/env bash
# Lint and type checks (configured in pyproject.toml): ruff check, ruff format --check, mypy. Runs all three,
# so one run shows every kind of finding, and closes on one line naming what failed.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BIN="${PULSE_VENV:-.venv}/bin"
for tool in ruff mypy; do
  [[ -x "$BIN/$tool" ]] || { echo "lint: FAILED: $BIN/$tool is missing (scripts/bootstrap.sh installs the dev extra)"; exit 1; }
done

failed=()
out="$(mktemp)"
trap 'rm -f "$out"' EXIT

"$BIN/ruff" check --no-fix --output-format concise . | tee "$out"
[[ ${PIPESTATUS[0]} == 0 ]] || failed+=("ruff check: $(grep -cE '^[^ ]+:[0-9]+:[0-9]+: [A-Z]+[0-9]+ ' "$out") finding(s)")

"$BIN/ruff" format --check --output-format concise . | tee "$out"
[[ ${PIPESTATUS[0]} == 0 ]] || failed+=("ruff format: $(grep -c ': unformatted: ' "$out") file(s) to reformat")

"$BIN/mypy" | tee "$out"
[[ ${PIPESTATUS[0]} == 0 ]] || failed+=("mypy: $(grep -c ': error:' "$out") error(s)")

if ((${#failed[@]})); then
  summary="$(printf '%s; ' "${failed[@]}")"
  echo "lint: FAILED: ${summary%; } (make lint shows each; the fixers are ruff check --fix and ruff format)"
  exit 1
fi
echo "lint: OK"
