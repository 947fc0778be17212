#!/usr/bin/env bash
# The full regression matrix: both strategies x both outbox modes x faults on/off, each a papermill run
# of notebooks/regression/checkout_regression.ipynb. Results (executed notebooks and JSON) go to $OUT.
# Usage: scripts/run_matrix.sh [ORDERS] (default 200). Makes a private database, vhost, Redis DB and slot from
# the PULSE_* services and drops them at the end (see python -m pulse.lab.matrix --help; --shared to opt out).
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m pulse.lab.matrix --orders "${1:-200}" --out "${OUT:-build/matrix}"
