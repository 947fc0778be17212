#!/usr/bin/env bash
# The project-local Python environment: .venv with Checkout Pulse installed editable, extras lab, test and dev.
# pyproject.toml is the single list of dependencies. A second run returns at once unless pyproject.toml
# changed since the last install (or FORCE=1).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${PULSE_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.pulse-installed"

say() { printf 'bootstrap: %s\n' "$*"; }
fail() { printf 'bootstrap: %s\n' "$*" >&2; exit 1; }

wanted="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [[ "${FORCE:-0}" != 1 && -x "$VENV/bin/pulse" && -f "$STAMP" && "$(cat "$STAMP")" == "$wanted" ]] \
   && "$VENV/bin/python" -I -c 'import pulse' 2>/dev/null; then
  say "$VENV is up to date"
  exit 0
fi

command -v "$PYTHON" >/dev/null || fail "no $PYTHON found: install Python 3.11 or newer (Debian: sudo apt-get install python3 python3-venv)."
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || fail "$("$PYTHON" -V 2>&1) is too old: Checkout Pulse needs Python 3.11 or newer (set PYTHON=/path/to/python3.11)."

if [[ ! -x "$VENV/bin/python" ]]; then
  "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null \
    || fail "$PYTHON cannot create virtual environments: install the venv module (Debian: sudo apt-get install python3-venv)."
  say "creating $VENV with $("$PYTHON" -V 2>&1)"
  "$PYTHON" -m venv "$VENV"
fi

say "installing checkout-pulse with extras lab, test and dev into $VENV (a few minutes the first time)"
# This machine's pip configuration may list a local index folder that does not exist; its warnings are noise.
"$VENV/bin/python" -m pip install --quiet -e '.[lab,test,dev]' 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
echo "$wanted" > "$STAMP"
"$VENV/bin/pulse" --help >/dev/null || fail "the install finished but $VENV/bin/pulse does not run; see the pip output above."
say "done: $VENV/bin/pulse is installed"
