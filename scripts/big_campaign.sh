#!/usr/bin/env bash
# A chaos campaign against PRIVATE services: a fresh PostgreSQL database, RabbitMQ vhost, Redis DB index and
# replication slot, all removed at the end (bench/private.py), so it never touches the default database `pulse`,
# vhost `/` or Redis DB 0 that others may be using.
# Usage: scripts/big_campaign.sh [ORDERS] [OUT] [-- extra `pulse chaos` options]
#   ORDERS  checkouts to attempt (default 10000)
#   OUT     where to write the JSON summary (default bench/results/chaos_large.json; '-' for stdout only)
# Example: scripts/big_campaign.sh 300 - -- --outbox-mode cdc --strategy post-payment
set -euo pipefail
cd "$(dirname "$0")/.."
ORDERS="${1:-10000}"
OUT="${2:-bench/results/chaos_large.json}"
shift $(( $# > 2 ? 2 : $# ))
[ "${1:-}" = "--" ] && shift
exec .venv/bin/python - "$ORDERS" "$OUT" "$@" <<'PY'
import argparse, json, logging, os, sys, time

sys.path.insert(0, os.getcwd())
from bench.private import Private
from pulse.cli import chaos as cli_chaos
from pulse.tools.chaos import Campaign

orders, out, extra = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
parser = argparse.ArgumentParser(prog="big_campaign")
cli_chaos.register(parser.add_subparsers())
args = parser.parse_args(["chaos", "--orders", str(orders), *extra])
with Private() as private:
    os.environ.update(private.env)  # the campaign and its `pulse serve` child read their settings from here
    print(f"big_campaign: private database/vhost/slot {private.tag}, Redis {private.settings.redis_url}",
          file=sys.stderr)
    started = time.time()
    summary = Campaign.from_args(args).run()
    summary["ordersPerS"] = round(sum(summary["ordersByState"].values()) / max(summary["durationS"], 0.1), 1)
text = json.dumps(summary, indent=1, default=str)
print(text)
if out != "-":
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        f.write(text + "\n")
sys.exit(0 if not summary["violations"] else 1)
PY
