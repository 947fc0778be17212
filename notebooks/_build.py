"""Generate every notebook of the lab from this file, so they are reproducible and reviewed as code.

    .venv/bin/python notebooks/_build.py          # rewrites notebooks/**/*.ipynb (outputs empty)

Edit the cells here, never the .ipynb files: a test fails when a committed notebook has outputs.
Each notebook: a ``parameters`` cell of UPPER_CASE constants (SMALL shrinks everything for CI),
short cells calling :mod:`pulse.lab`, narrative, a "what you saw" summary, and a last cell that records
its results with :func:`pulse.lab.record` (to ``RECORD_PATH`` or ``$PULSE_LAB_RECORD_DIR``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _workshops import WORKSHOPS  # noqa: E402  (the exercise notebooks live in their own file)

KERNEL = {
    "kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"},
    "language_info": {"name": "python"},
}

COMMON_PARAMS = """STRATEGY = "optimistic"     # or "post-payment"
OUTBOX_MODE = None          # None: PULSE_OUTBOX_MODE (or the default); "polling" or "cdc"
SMALL = False               # True: tiny sizes, for CI
RECORD_PATH = None          # where the last cell writes its results as JSON (None: $PULSE_LAB_RECORD_DIR)"""

IMPORTS = """import time
import pandas as pd
from pulse.lab import Lab, record, IPHONE, AIRPODS, MACBOOK, KINDLE
from pulse.lab import scenarios as sc
from pulse.lab import teach"""


def md(text: str):
    return new_markdown_cell(text.strip())


def code(text: str):
    return new_code_cell(text.strip())


def params(extra: str = "", common: str = COMMON_PARAMS):
    cell = new_code_cell((common + ("\n" + extra.strip() if extra else "")).strip())
    cell.metadata["tags"] = ["parameters"]
    return cell


def gparams(extra: str = ""):
    """A guided notebook's parameters: the common ones, the learner's PREDICTIONS, then its own."""
    return params(
        extra,
        COMMON_PARAMS + "\nPREDICTIONS = {}            # your predictions by key, for a headless run; "
        "live, answer the choices instead",
    )


def goals(*items: str):
    """The learning goals a notebook opens with (2 to 4)."""
    assert 2 <= len(items) <= 4
    return md("**Learning goals.** By the end of this notebook you can\n" + "\n".join(f"- {g}" for g in items))


def finish(name: str, extra: str, results: str):
    """The closing cells: "What you saw" written from the recorded numbers, stop, record (with demonstrations)."""
    return [
        md("## What you saw\nWritten from what this run measured (rerun it and the sentences follow the numbers):"),
        code(f"saw = teach.what_you_saw(lab.demonstrations, extra={extra.strip()})"),
        code("lab.stop()   # stops the dashboard, the event tap and the server; also done at exit"),
        code(
            f'record({{**{results.strip()}, "demonstrations": lab.demonstrations, '
            f'"predictions": teach.predictions()}}, RECORD_PATH, notebook="{name}")'
        ),
    ]


def notebook(cells) -> nbformat.NotebookNode:
    nb = new_notebook(cells=cells, metadata=KERNEL)
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i:02d}"  # stable ids: a rebuild changes nothing that was not edited
    return nb


NB00 = [
    md("""# 00 · Set-up and a tour of the services
Checkout Pulse is a small shop's checkout: a cart that **reserves stock in Redis** (atomically, in Lua),
orders in **PostgreSQL**, and a **saga** of events over **RabbitMQ** (inventory, payment, orders, a read view).
This notebook starts the real system and walks through where each piece of state lives.
Every helper used here has a docstring: try `Lab?` or `help(teach.demonstrate)`."""),
    goals(
        "name the three services and what each one holds",
        "find a cart's keys in Redis and an order's events on the broker",
        "read a sequence chart of one checkout: outbox → broker → each module's inbox",
    ),
    gparams("ORDERS = 30"),
    code("if SMALL:\n    ORDERS = 6"),
    code(IMPORTS),
    md("## The services\nThe lab needs PostgreSQL, Redis and RabbitMQ. `check_services` pings each one."),
    code("lab = Lab(strategy=STRATEGY, outbox_mode=OUTBOX_MODE)\nservices = lab.check_services()\nservices"),
    md("""## Start the system
`start()` migrates the schema, empties the previous run, seeds the catalogue and starts `pulse serve` as a
**supervised child process**: if a fault crashes it, the lab restarts it and this kernel carries on."""),
    code('lab.start()\nprint("API:", lab.url, "· OpenAPI docs:", lab.url + "/docs")'),
    code("pd.DataFrame(lab.client.products())"),
    md("""## A cart lives in Redis first
Adding an item runs this script — the real one, read from `lua/`: it checks `stock:{id} − reserved:{id}` and
increments `reserved:` in one atomic step. The cart itself is the hash `cart:{user}`; `cart:cleanup:queue`
remembers when it expires."""),
    code("_ = teach.lua('reserve_stock')"),
    code(
        "teach.predict('After one add of 1 iPhone, what is reserved:{iPhone}?', ['0', '1', 'the stock'], 'reserved', PREDICTIONS)"
    ),
    code(
        "user = lab.client.new_user()\nlab.client.add_item(user, IPHONE, 1)\n"
        "r = lab.redis()\nsorted(k for k in r.scan_iter(match='*') if k.split(':')[0] in ('stock', 'reserved', 'cart'))"
    ),
    code(
        "cart_state = {'stock': r.get(f'stock:{IPHONE}'), 'reserved': r.get(f'reserved:{IPHONE}'), 'cart': r.hgetall(f'cart:{user}')}\n"
        "teach.reveal('reserved', cart_state['reserved'])\ncart_state"
    ),
    md(
        "## The broker: five queues, one per module\nThe relay publishes every event to `outbox-exchange`, "
        "with its type as the routing key. Each queue is bound to the events its module acts on. Which those "
        "are depends on the order's strategy, recorded with the order and carried by every event (in its "
        "payload, and in a `strategy` header): where a module acts on an event for one strategy only, the event "
        "passes through `outbox-exchange.by-strategy`, which routes by that header, so no module hears the other "
        "strategy's events (`pulse/topology.py` declares it all in one table):"
    ),
    code(
        "from pulse import topology\n"
        "pd.DataFrame([(q, ', '.join(events)) for q, events in "
        "topology.handled_events(lab.settings.strategy_name).items()], columns=['queue', 'events'])"
    ),
    md("""## One checkout
`POST /api/orders` writes the order **and** its `ORDER_CREATED` event into the outbox in one transaction.
The relay publishes the outbox; each module records the event id in its **inbox** in the same transaction
as its effect. The chart shows each event's trip: outbox → broker → every module that handled it."""),
    code("order = lab.client.wait_settled(lab.client.checkout(user)['orderId'])\norder"),
    code("timeline = sc.show_sequence(lab, order['orderId'])\ntimeline.head(12)"),
    md("""## The dashboard
Live charts and controls (strategy, outbox mode, load, faults, naive switches, reconcile/sweep buttons).
It redraws in a background thread, so you can keep running cells. `render()` draws it once, statically."""),
    code("dash = lab.dashboard()\ndash.show()"),
    code(
        "placed = lab.run_orders(ORDERS, [IPHONE, AIRPODS, KINDLE], concurrency=4)\nlab.wait_quiet()\n"
        "summary = dash.render()\nsummary"
    ),
    *finish(
        "00_setup_and_tour",
        """[
    f"Services: {', '.join(f'{k} {v}' for k, v in services.items())}; one supervised `pulse serve` (restarts: {lab.restarts}).",
    f"One add left `reserved:` at {cart_state['reserved']} and the cart hash {cart_state['cart']} in Redis.",
    f"One order ended {order['displayStatus']}; its events passed through {', '.join(sorted(set(timeline['stage'])))}.",
    f"{placed['placed']} more orders placed under load; the dashboard counted them to their end."]""",
        '{"services": services, "orderStatus": order["displayStatus"], "placed": placed["placed"], '
        '"summary": summary, "stages": sorted(set(timeline["stage"]))}',
    ),
]

NB01 = [
    md("""# 01 · One checkout through the saga, step by step, both strategies
**Optimistic**: reserve stock first, then charge. **Post-payment**: charge first, then reserve.
Same events, different order. Here you *hold* every delivery and release the events one at a time."""),
    goals(
        "walk an order through the saga one delivery at a time and say which module acted on which event",
        "contrast the optimistic and post-payment orders of steps",
        "see the CQRS view lag behind the order, and what read-your-writes means here",
    ),
    gparams(),
    code(IMPORTS),
    code("lab = Lab(strategy='optimistic', outbox_mode=OUTBOX_MODE).start()\norders, walks = {}, {}"),
    md("""## Hold the deliveries
`lab.hold()` restarts the server with its API only: nothing relays the outbox, nothing consumes. The stepper
does both jobs in this kernel, with the same dispatchers a consumer runs (`System.dispatcher(queue)`), and after
each delivery shows the rows and keys that changed. (Live, `stepper.widget()` gives you *Step* buttons.)"""),
    code("stepper = lab.hold()\nopt = lab.checkout({IPHONE: 1}, wait=False)\nstepper.waiting()"),
    code(
        "teach.predict('Inventory reserves the stock for ORDER_CREATED. Which event does it write to the outbox?', "
        "['STOCK_RESERVED', 'PAYMENT_PROCESSED', 'ORDER_COMPLETED'], 'first-opt', PREDICTIONS)"
    ),
    code("first = lab.step('inventory.queue')   # deliver ORDER_CREATED to inventory"),
    code("teach.reveal('first-opt', first['emitted'][0] if first['emitted'] else 'nothing')\nstepper.waiting()"),
    md("Now the rest, one event after another: read each table — which row, which key moved?"),
    code("walks['optimistic'] = [first] + stepper.run()"),
    md("""## The view lags behind the order (CQRS)
The API's `status` comes from the order row — the write side. `displayStatus` comes from the read model
`orders.order_views`, updated only when `order-view.queue` delivers `ORDER_UPDATED`. Hold that one queue back:"""),
    code(
        "post_user = lab.client.new_user()\nlab.client.add_item(post_user, KINDLE, 1)\nlagging = lab.client.checkout(post_user)\n"
        "stepper.run(hold_back=['order-view.queue'], show=False)\n"
        "steps_left = stepper.waiting()\nview_lag = lab.client.order(lagging['orderId'])\n"
        "{'status (the write)': view_lag['status'], 'displayStatus (the view)': view_lag['displayStatus']}"
    ),
    code("steps_left"),
    md("""Whoever wrote the order and reads `status` sees their write at once (read-your-writes holds for the
write model); a screen that reads the view sees the past until the view catches up. Deliver the rest:"""),
    code("stepper.run(show=False)\ncaught_up = lab.client.order(lagging['orderId'])\ncaught_up['displayStatus']"),
    md("## Post-payment: the same walk, charge first"),
    code(
        "lab.switch(strategy='post-payment')\nstepper = lab.hold()\npost = lab.checkout({IPHONE: 1}, wait=False)\n"
        "teach.predict('Post-payment: which module acts first on ORDER_CREATED?', ['inventory', 'payment', 'orders'], "
        "'first-post', PREDICTIONS)"
    ),
    code(
        "walks['post-payment'] = stepper.run(show=False)\n"
        "first_post = next(s for s in walks['post-payment'] if s['acted'] and s['event'] == 'ORDER_CREATED' "
        "and s['module'] in ('inventory', 'payment'))\nteach.reveal('first-post', first_post['module'])\n"
        "pd.DataFrame([(s['n'], s['module'], s['event'], len(s['changes'])) for s in walks['post-payment']], "
        "columns=['step', 'module', 'event', 'changes'])"
    ),
    code(
        "lab.release()\norders = {'optimistic': lab.client.order(opt['orderId']), 'post-payment': lab.client.order(post['orderId'])}\n"
        "pd.DataFrame(orders).T[['status', 'displayStatus', 'paymentStatus', 'inventoryStatus', 'strategy']]"
    ),
    md("## The same two orders on the real broker"),
    code("sc.show_sequence(lab, lab.checkout({IPHONE: 1})['orderId'], 'post-payment, through RabbitMQ');"),
    *finish(
        "01_one_checkout_both_strategies",
        """[
    f"Optimistic: {' → '.join(s['module'] + ':' + s['event'] for s in walks['optimistic'] if s['acted'] and s['module'] in ('inventory', 'payment'))}.",
    f"Post-payment: {' → '.join(s['module'] + ':' + s['event'] for s in walks['post-payment'] if s['acted'] and s['module'] in ('inventory', 'payment'))}.",
    f"With order-view.queue held, the order row said {view_lag['status']} while the view said {view_lag['displayStatus']}; after delivery the view said {caught_up['displayStatus']}."]""",
        '{s: {"status": o["displayStatus"], "strategy": o["strategy"]} for s, o in orders.items()} | '
        '{"events": {k: [s["module"] + ":" + s["event"] for s in w if s["acted"] and s["module"] in ("inventory", "payment")] '
        'for k, w in walks.items()}, "viewLag": {"status": view_lag["status"], "view": view_lag["displayStatus"], '
        '"caughtUp": caught_up["displayStatus"]}}',
    ),
]


NB02 = [
    md("""# 02 · Atomic reservation and the cart's promise
Many shoppers add the last units at the same moment. Two safeguards stand between them and an oversell:
the **Lua script** that checks and reserves in one step, and the **cart's promise**: the hold a cart add took
lasts until inventory has decided for the order. You switch each one off, predict, and let the checker judge."""),
    goals(
        "explain why a GET-then-SET reservation oversells under concurrency and the Lua script does not",
        "say what the Lua script guarantees and what the cart's hold adds to it",
        "read an invariant report (`no-oversell`, `cart-promise-kept`) for one scenario",
    ),
    gparams("STOCK = 10\nSHOPPERS = 40"),
    code("if SMALL:\n    STOCK, SHOPPERS = 3, 16"),
    code(IMPORTS),
    code("lab = Lab(strategy=STRATEGY, outbox_mode=OUTBOX_MODE).start()"),
    md("""## The mechanism: one script, run atomically by Redis
Redis runs a script to the end before any other command: between the check and the increment, nothing else
can read `reserved:`. This is the script the cart runs:"""),
    code("_ = teach.lua('reserve_stock')"),
    md("""## The naive version, as the `reserve-get-set` switch runs it
Read `stock:` and `reserved:`, decide, write `reserved:` back: three commands, with other requests free to run
between them. Note the `time.sleep(0.1)` — it is **there on purpose, in naive mode only**: on one machine the
gap between GET and SET is well under a millisecond, so the race is real but would show only now and then. The
sleep widens the window to 100 ms so that every run of this notebook shows it, even on a busy machine;
production code under real load, with a network hop or a slow step between its read and its write, has
windows of that size without any sleep."""),
    code("from pulse.cart.service import CartService\n_ = teach.source(CartService._reserve_get_set)"),
    code(
        "teach.predict(f'{SHOPPERS} shoppers add 1 unit of a product with {STOCK} in stock, at the same moment, '\n"
        "              'with GET/SET. How many carts are accepted?', ['exactly the stock', 'more than the stock', "
        "'fewer than the stock'], 'get-set', PREDICTIONS)"
    ),
    md("""## Safeguard off, then on
`lab.demonstrate` runs the same scenario twice — with the naive switch on (safeguard off), then off — and
checks each run with `lab.check()` for its own product and time. It *asserts* the lesson: the first run must
break an invariant the fault catalogue names for this switch, the second must break none."""),
    code(
        "rush = lab.demonstrate('lua-reservation', 'reserve-get-set', "
        "lambda lab: sc.rush(lab, stock=STOCK, shoppers=SHOPPERS),\n"
        "                       says='{accepted} carts accepted for {stock} units')\nteach.show(rush, ['accepted', 'stock'])"
    ),
    code(
        "off = rush['off']['accepted']\nteach.reveal('get-set', 'more than the stock' if off > STOCK else "
        "'exactly the stock' if off == STOCK else 'fewer than the stock')"
    ),
    md("""## What Lua guarantees, and what it does not
The script guarantees that **no two cart adds take the same unit**: at every moment `reserved:` ≤ `stock:`.
It does not say how long a hold lasts. When the shopper orders, the hold must move from the cart to the order
and last **until inventory has decided** (reserved the units in PostgreSQL, or failed). That is the cart's
promise, kept by these two scripts — the move at `ORDER_CREATED`, the release at the decision:"""),
    code("_ = teach.lua('move_hold')"),
    code("_ = teach.lua('settle_hold')"),
    md("""The `release-on-order-created` switch releases the hold at `ORDER_CREATED` instead. The scenario holds
every delivery (`lab.hold()`, see notebook 01), delivers only the first shopper's `ORDER_CREATED` to the Redis
module, then lets a second shopper try to add the same last unit, and then delivers the rest."""),
    code(
        "teach.predict('The hold is released at ORDER_CREATED. Does the second shopper get the last unit into the cart?', "
        "['yes, and the order completes', 'yes, but the order fails out of stock', 'no, the add is refused'], "
        "'promise', PREDICTIONS)"
    ),
    code(
        "promise = lab.demonstrate('cart-promise', 'release-on-order-created', sc.promise_window,\n"
        "                          says='second cart accepted {secondCartAccepted} time(s), {outOfStockOrders} order(s) failed out of stock')\n"
        "lab.release()\nteach.show(promise, ['secondCartAccepted', 'outOfStockOrders'])"
    ),
    code(
        "teach.reveal('promise', 'yes, but the order fails out of stock' if promise['off']['outOfStockOrders'] else "
        "'yes, and the order completes' if promise['off']['secondCartAccepted'] else 'no, the add is refused')"
    ),
    md("""So: Lua makes each reservation atomic; the cart's hold makes the *yes* a shopper got at the cart still
true when inventory decides. PostgreSQL stays the last line of defence either way (stock never below zero), but
only both together keep the shopper from being told *yes* and then *sold out*."""),
    md("""## Carts that expire: who gives the hold back?
A cart that nobody orders must give its units back after a while (`PULSE_CART_TTL_S`, minutes). Each add records
the cart's expiry in the sorted set `cart:cleanup:queue`; the **sweeper** runs this script every interval: for
each expired cart it reads the cart hash — the only record of *which* units it holds — releases them from
`reserved:` and deletes the hash, in one atomic step (and then clears the database rows):"""),
    code("_ = teach.lua('remove_expired_reserves')"),
    md("""The original let Redis expire the cart hash by itself (a native `PEXPIREAT` on `cart:{user}`) — tidy, but
Redis then drops the hash *with* the list of held units, and the sweeper finds nothing to give back. The
`cart-native-ttl` switch does just that. The scenario fills two carts whose TTL the fault `cart.short_ttl`
shortens to one second, waits until they expired, and runs one sweeper pass (`lab.sweep_now()`).
`reserved-before-repair` compares `reserved:` with the holds the database knows *before* reconciliation
(the safety net that would hide the leak some minutes later)."""),
    code(
        "teach.predict('Two expired carts, each holding 1 unit, Redis expired the hash itself. After the sweep, '\n"
        "              'how many units does reserved: still count?', ['0', '2'], 'expiry', PREDICTIONS)"
    ),
    code(
        "expiry = lab.demonstrate('cart-expiry', 'cart-native-ttl', sc.expiring_carts,\n"
        "                         says='{cartHashesAtSweep} cart hash(es) left at the sweep, reserved: still {reservedAfterSweep}')\n"
        "teach.show(expiry, ['reservedAfterSweep', 'cartHashesAtSweep'])"
    ),
    code("teach.reveal('expiry', str(expiry['off']['reservedAfterSweep']))"),
    *finish(
        "02_lua_vs_naive_oversell",
        "[]",
        '{"stock": STOCK, "shoppers": SHOPPERS, "naiveAccepted": rush["off"]["accepted"], '
        '"luaAccepted": rush["on"]["accepted"]}',
    ),
]

NB03 = [
    md("""# 03 · The transactional outbox: polling vs WAL CDC, confirms, and a lost message
Every change writes its events into `shared.outbox` **in the same transaction**. A relay publishes them:
**polling** reads the table; **CDC** reads PostgreSQL's write-ahead log."""),
    goals(
        "explain why the outbox row and the business row must share one transaction",
        "say what publisher confirms (with `mandatory`) guarantee, and show an event lost without them",
        "compare polling and CDC latency, knowing exactly what was measured",
        "see a message lost after the broker stall an order until the watchdog re-drives it",
    ),
    gparams("ORDERS = 40\nWATCHDOG_DEADLINE_S = 2"),
    code("if SMALL:\n    ORDERS = 10"),
    code(IMPORTS),
    code(
        "# The server's own watchdog waits a minute before it re-drives a stalled order; at the end, this notebook runs\n"
        "# the same watchdog passes itself with WATCHDOG_DEADLINE_S, so you see them at work without waiting.\n"
        "lab = Lab(strategy=STRATEGY, outbox_mode='polling', env={'PULSE_WATCHDOG_DEADLINE_S': '60', "
        "'PULSE_WATCHDOG_INTERVAL_S': '1'}).start()\nlatency = {}"
    ),
    md("""## The polling relay
It claims a batch (`FOR UPDATE SKIP LOCKED`, so two relays never take the same rows), publishes it with
confirms and `mandatory` (the broker returns a message no queue is bound to), and deletes only the rows the broker
confirmed *and* routed, in the same transaction as the claim:"""),
    code(
        "from pulse.infra import relay_polling\n_ = teach.source(relay_polling.CLAIM, language='sql')\n"
        "_ = teach.source(relay_polling.PollingRelay._relay_batch)"
    ),
    md("""## Latency: what is measured
Each outbox insert is logged with the inserting transaction's `clock_timestamp()` (`infra.event_log`); the lab's
tap is a private queue bound to every event. So the figure is **INSERT's clock_timestamp → the tap received it**:
it includes the rest of the writing transaction, the relay's wait, the publish and the broker's delivery to the
tap — not "commit → broker"."""),
    code(
        "teach.predict('Which relay has the lower median latency here?', ['polling', 'cdc', 'about the same'], "
        "'latency', PREDICTIONS)"
    ),
    code(
        "mark = len(lab.tap.events)\nlab.run_orders(ORDERS, [IPHONE, KINDLE])\nlab.wait_quiet()\n"
        "latency['polling'] = sc.publish_latency(lab, since=mark)\nlatency['polling'].latency_ms.describe()"
    ),
    code(
        "lab.switch(outbox_mode='cdc')\nmark = len(lab.tap.events)\nlab.run_orders(ORDERS, [IPHONE, KINDLE])\n"
        "lab.wait_quiet()\nlatency['cdc'] = sc.publish_latency(lab, since=mark)\nlab.switch(outbox_mode='polling')"
    ),
    code(
        "table = pd.DataFrame({mode: df.latency_ms.quantile([0.5, 0.9, 0.99]) for mode, df in latency.items()})\n"
        "table.index = ['p50 ms', 'p90 ms', 'p99 ms']\ntable"
    ),
    code(
        "sc.show_bars({m: float(df.latency_ms.quantile(0.5)) for m, df in latency.items()}, "
        "'outbox INSERT → tap, median (ms)', ylabel='ms')\n"
        "p50 = {m: float(df.latency_ms.quantile(0.5)) for m, df in latency.items()}\n"
        "teach.reveal('latency', 'about the same' if len(p50) < 2 or abs(p50['polling'] - p50['cdc']) < 0.2 * max(p50.values()) "
        "else min(p50, key=p50.get))"
    ),
    md("""## Confirms: a crash right after publishing, with and without them
`relay.after_publish` kills the server right after its relay handed a batch to the broker. With confirms the
rows are deleted only after the broker confirmed them, so the restarted relay publishes them again: duplicates,
which the inboxes absorb. The `publish-no-confirm` switch deletes the rows first and writes to the socket
after — the crash then loses whatever had not left the process. A lost publish is not impossible: it is what
confirms (and `mandatory`, for a message no queue would take) are there to prevent."""),
    code(
        "teach.predict('Without confirms, after the crash, does the checker find every event delivered?', "
        "['yes', 'no, events were lost'], 'confirms', PREDICTIONS)"
    ),
    code(
        "confirms = lab.demonstrate('publisher-confirms', 'publish-no-confirm', lambda lab: sc.relay_crash(lab, wait_s=5),\n"
        "                           says='{crashes} crash(es)')\nteach.show(confirms, ['crashes', 'completed'])"
    ),
    code("teach.reveal('confirms', 'no, events were lost' if 'delivery' in confirms['off']['violations'] else 'yes')"),
    md("""## What a lost message after the broker looks like, and the watchdog
Confirms cover the trip to the broker. After it, a consumer can still lose a message — acked, never handled
(a bug, an operator purging a queue). Nothing will ever announce that step again: the order waits. The **saga
watchdog** looks for orders that have not moved for longer than a deadline, works out from the database which
event the saga is missing, and announces it again through the outbox — for the one queue that missed it:"""),
    code(
        "from pulse.orders.watchdog import Watchdog, next_step\n_ = teach.source(Watchdog.run_once)\n_ = teach.source(next_step)"
    ),
    md("""`no-watchdog` makes every pass do nothing. The scenario arms `consumer.lose` for one `order.queue` message,
places an order, and then runs watchdog passes (deadline `WATCHDOG_DEADLINE_S`) for a few seconds."""),
    code(
        "teach.predict('One of the order\\'s events is lost and no watchdog runs. How does the order end?', "
        "['COMPLETED, a bit later', 'stuck where the event was lost'], 'watchdog', PREDICTIONS)"
    ),
    code(
        "watch = lab.demonstrate('watchdog', 'no-watchdog', lambda lab: sc.lost_event(lab, deadline_s=WATCHDOG_DEADLINE_S),\n"
        "                        says='the order stalled at {stalledStatus} and ended {finalStatus}')\n"
        "teach.show(watch, ['completed'])"
    ),
    code(
        "teach.reveal('watchdog', 'COMPLETED, a bit later' if watch['off']['completed'] else 'stuck where the event was lost')\n"
        "stalled, lost = {'status': watch['on']['stalledStatus']}, {'displayStatus': watch['on']['finalStatus']}"
    ),
    *finish(
        "03_outbox_polling_vs_cdc",
        """[
    "Median INSERT → tap latency: " + ", ".join(f"{m} {v:.1f} ms" for m, v in p50.items()) + ".",
    f"A message lost after the broker left the order {stalled['status']} until the watchdog re-drove it; it ended {lost['displayStatus']}."]""",
        '{"latencyP99Ms": {m: round(float(df.latency_ms.quantile(0.99)), 2) for m, df in latency.items()}, '
        '"events": {m: len(df) for m, df in latency.items()}, "restarts": lab.restarts, '
        '"crashedOrder": "COMPLETED" if confirms["on"]["completed"] else "NOT COMPLETED", '
        '"lostOrderStalled": stalled["status"], "lostOrder": lost["displayStatus"]}',
    ),
]


NB04 = [
    md("""# 04 · Compensation, step by step and live, and the state guards that keep it done
A saga has no rollback; each failure is undone by a **compensating** step.
Optimistic: a declined card → `PAYMENT_FAILED` → inventory **restocks**. Post-payment: out of stock after the
charge → `STOCK_FAILED` → payment **refunds**."""),
    goals(
        "walk a declined order through its compensation and name the rows each step changed",
        "explain why a post-payment order that cannot be reserved is refunded",
        "show why an order's state machine must refuse a late event once the order has failed",
    ),
    gparams("ORDERS = 40\nDECLINE_RATE = 0.3\nSCARCE_STOCK = 3"),
    code("if SMALL:\n    ORDERS = 12"),
    code(IMPORTS),
    code("lab = Lab(strategy='optimistic', outbox_mode=OUTBOX_MODE).start()"),
    md("""## A declined card, one delivery at a time
Deliveries are held (`lab.hold()`); `payment.decline` declines the next charge."""),
    code(
        "teach.predict('The card is declined after inventory reserved the unit. Which module acts on PAYMENT_FAILED '\n"
        "              'and changes a row?', ['inventory', 'payment', 'nobody'], 'restock', PREDICTIONS)"
    ),
    code(
        "stepper = lab.hold()\nlab.arm('payment.decline', 1.0, max=1)\ndeclined = lab.checkout({KINDLE: 1}, wait=False)\n"
        "walk = stepper.run()\nlab.disarm('payment.decline')\nlab.release()   # relay and consumers back"
    ),
    code(
        "restock = next(s for s in walk if s['event'] == 'PAYMENT_FAILED' and s['acted'] and s['module'] != 'orders' "
        "and s['changes'])\nteach.reveal('restock', restock['module'])\npd.DataFrame(restock['changes'])"
    ),
    md("## Live: a declining card provider, then post-payment with a scarce product"),
    code(
        "live_since = lab.now()\nlab.switch(decline_rate=DECLINE_RATE)\nlab.run_orders(ORDERS, [IPHONE, AIRPODS, KINDLE])\nlab.wait_quiet()\n"
        "compensations = lab.q.compensation_totals()\ncompensations"
    ),
    md("""With post-payment the charge comes first. The cart's hold stays until inventory decides (notebook 02), so
only as many carts as units reach checkout; one order loses its unit to the warehouse (damaged stock) after the
charge — it must be refunded."""),
    code(
        "lab.switch(strategy='post-payment', decline_rate=0.0)\nscarce = lab.new_product(stock=SCARCE_STOCK, name='Limited edition')\n"
        "lab.run_orders(max(ORDERS // 2, 2 * SCARCE_STOCK), [scarce], concurrency=4)\nlab.wait_quiet()"
    ),
    code(
        "damaged = lab.new_product(stock=1, name='Last unit')\nuser = lab.client.new_user()\nlab.client.add_item(user, damaged, 1)\n"
        "lab.execute('UPDATE inventory.inventory_items SET available_quantity = 0, version = version + 1, '\n"
        "            'updated_at = now() WHERE product_id = %s', (damaged,))   # the warehouse finds it broken\n"
        "refunded = lab.client.wait_settled(lab.client.checkout(user)['orderId'])\nrefunded['displayStatus']"
    ),
    md(
        "Every invariant should hold for this live run (its time, its products): no stock lost, every charge "
        "either completed an order or was refunded."
    ),
    code(
        "checks = pd.DataFrame(lab.check(since=live_since, products=[IPHONE, AIRPODS, KINDLE, scarce]))\n"
        "checks[['name', 'ok', 'detail']]"
    ),
    code("summary = {'compensations': lab.q.compensation_totals(), 'outcomes': lab.q.outcome_totals()}\nsummary"),
    md("""## A compensation that forgets its effect
The restock you walked through above is this handler: on `PAYMENT_FAILED` it marks the reservation RELEASED
**and** puts the units back on the shelf, in one transaction:"""),
    code("from pulse.inventory import handlers as inventory_handlers\n_ = teach.source(inventory_handlers.on_restock)"),
    md("""`no-compensation` keeps the first half only: the reservation says RELEASED, the units never return.
The scenario declines one optimistic order after inventory reserved its unit. `stock-conservation` checks, per
product, that initial stock = available + units held by RESERVED reservations."""),
    code(
        "teach.predict('The declined order\\'s reservation is marked RELEASED but nothing restocks. Which invariant breaks?', "
        "['none', 'stock-conservation', 'money-balance'], 'compensation', PREDICTIONS)"
    ),
    code(
        "lab.switch(strategy='optimistic', decline_rate=0.0)\n"
        "comp = lab.demonstrate('compensation', 'no-compensation', sc.declined_order,\n"
        "                       says='{unitsBack} of {ordered} unit(s) back on the shelf, reservation {reservation}')\n"
        "teach.show(comp, ['unitsBack', 'ordered'])"
    ),
    code(
        "teach.reveal('compensation', next((v for v in comp['off']['violations'] if v in ('stock-conservation', 'money-balance')), 'none'))"
    ),
    md("""## The state guards
The order's state machine moves each sub-status **forward only**, and a terminal order never changes again.
This is the rule, as the orders module runs it:"""),
    code("from pulse.orders import model\n_ = teach.source(model.apply_event)"),
    md("""`unguarded-state` drops the guard. The scenario declines an order (held deliveries, as above), lets it fail
and compensate, then delivers its first decision, `STOCK_RESERVED`, once more — late, as a watchdog that took a
slow event for a lost one would re-announce it."""),
    code(
        "teach.predict('Without the guard, what does the late STOCK_RESERVED do to the FAILED order?', "
        "['nothing', 'it moves the order away from its settled state'], 'guard', PREDICTIONS)"
    ),
    code(
        "guards = lab.demonstrate('state-guards', 'unguarded-state', sc.late_event,\n"
        "                         says='the order went from {statusBefore} to {statusAfter} (inventory {inventoryAfter})')\n"
        "lab.release()\nteach.show(guards, ['stillFailed', 'lateEvents'])"
    ),
    code(
        "teach.reveal('guard', 'nothing' if guards['off']['stillFailed'] else 'it moves the order away from its settled state')"
    ),
    *finish(
        "04_compensation_live",
        """[
    f"The declined order's PAYMENT_FAILED made {restock['module']} change: " + ", ".join(f"{c['what']} {c['before']}→{c['after']}" for c in restock['changes'][:4]) + ".",
    f"Under load: {summary['compensations']['restocks']} restock(s) after declined cards, {summary['compensations']['refunds']} refund(s) after out-of-stock.",
    f"The damaged-unit order ended {refunded['displayStatus']}."]""",
        '{"compensations": summary["compensations"], "outcomes": summary["outcomes"], '
        '"refundedOrder": refunded["displayStatus"], '
        '"violations": [c["name"] for c in checks.to_dict("records") if not c["ok"]]}',
    ),
]

NB05 = [
    md("""# 05 · Crash between Redis and the DB, lost events, a Redis flush — and reconciliation
Redis and PostgreSQL are two systems with no shared transaction. Three ways they drift apart, each charted,
and the **reconciler** that repairs Redis from PostgreSQL (the truth) — with a cooldown, and why it needs one."""),
    goals(
        "name three ways Redis and PostgreSQL drift apart",
        "explain the reconciler's cooldown window and what a full scan without it destroys",
        "read a drift chart before and after a reconciliation pass",
        "show that sagas in flight survive a broker restart and a database restart",
    ),
    gparams("COOLDOWN_S = 10\nORDERS = 20\nRESTART_ORDERS = 12\nGAP_S = 0.4\nBROKER_DOWN_S = 2.0"),
    code("if SMALL:\n    COOLDOWN_S, ORDERS, RESTART_ORDERS, BROKER_DOWN_S = 6, 6, 6, 1.0"),
    code(IMPORTS),
    code(
        "lab = Lab(strategy=STRATEGY, outbox_mode=OUTBOX_MODE).start()\nproduct = lab.new_product(stock=50, name='Drift demo')\n"
        "lab.reconcile_now(cooldown_s=0)   # a baseline: the first run covers everything\nfixes = {}"
    ),
    md("""## 1 · A crash between the Redis reservation and the DB commit
`cart.after_redis` kills the server after Redis reserved the unit and before PostgreSQL saved the cart.
Redis now holds a reservation nobody will ever order or release."""),
    code(
        "lab.arm('cart.after_redis', 1.0, max=1)\nghost = lab.client.new_user()\ntry:\n    lab.client.add_item(ghost, product, 2)\n"
        "except Exception as exc:\n    print('the server died mid-request:', type(exc).__name__)\nlab.wait_up()\n"
        "sc.show_drift(lab, [product], 'after the crash')"
    ),
    md("""## The cooldown window
The reconciler does not touch rows changed in the last `COOLDOWN_S` seconds: a request in flight has
already written Redis but not yet committed PostgreSQL, and "repairing" it would undo a correct reservation.
This is how a pass chooses its window:"""),
    code("from pulse.reconcile.service import Reconciler\n_ = teach.source(Reconciler.run_once)"),
    code(
        "teach.predict('A pass right now, inside the cooldown: does it remove the ghost reservation?', "
        "['yes', 'no, not yet'], 'cooldown', PREDICTIONS)"
    ),
    code(
        "fixes['crash-within-cooldown'] = lab.reconcile_now(cooldown_s=COOLDOWN_S)\nlab.disarm('cart.after_redis')\n"
        "teach.reveal('cooldown', 'yes' if fixes['crash-within-cooldown']['reserved'] else 'no, not yet')\n"
        "{k: fixes['crash-within-cooldown'][k] for k in ('reserved', 'carts', 'deferred', 'windowTo')}"
    ),
    code(
        "time.sleep(COOLDOWN_S + 0.5)\nfixes['crash-after-cooldown'] = lab.reconcile_now(cooldown_s=COOLDOWN_S)\n"
        "sc.show_drift(lab, [product], 'after reconciliation')"
    ),
    md("""## Without the cooldown
`reconcile-full-scan` rewrites every key from a database snapshot, cooldown or not. The scenario slows one cart
add between its Redis reservation and its database row, runs a pass in that moment, then lets two more
shoppers add the same product (2 in stock)."""),
    code(
        "teach.predict('Full scan during an add in flight: how many carts end up holding the 2 units?', "
        "['2', '3'], 'full-scan', PREDICTIONS)"
    ),
    code(
        "scan = lab.demonstrate('reconcile-cooldown', 'reconcile-full-scan', sc.reconcile_in_flight,\n"
        "                       says='{accepted} carts accepted for {stock} units')\nteach.show(scan, ['accepted', 'stock'])"
    ),
    code("teach.reveal('full-scan', str(scan['off']['accepted']))"),
    md("""## 2 · Lost events
First some ordinary orders: each one's `STOCK_RESERVED` also reaches `redis-stock.queue`, which refreshes
`stock:` from the database. Then `consumer.lose` acks the next two `redis-stock.queue` messages without
handling them — one order's `ORDER_CREATED` and `STOCK_RESERVED`. The order itself completes, but Redis
still promises the units PostgreSQL has handed out (`stock:` too high)."""),
    code(
        "lab.run_orders(ORDERS, [product])\nlab.wait_quiet()\n"
        "lab.arm('consumer.lose', 1.0, queue='redis-stock.queue', max=2)\n"
        "lost_order = lab.checkout({product: 3})\nlab.disarm('consumer.lose')\n"
        "lost_drift = sc.show_drift(lab, [product], 'after lost redis-stock events')\nlost_drift"
    ),
    code(
        "fixes['lost-events'] = lab.reconcile_now(cooldown_s=0)\nsc.show_drift(lab, [product], 'after reconciliation')"
    ),
    md("""## 3 · Redis loses everything
A Redis restart without persistence: every `stock:`, `reserved:` and `cart:` key is gone — including the
reconciler's marker, so the next pass knows it must cover everything, not just the recent delta."""),
    code(
        "user = lab.client.new_user()\nlab.client.add_item(user, product, 1)\nflushed = lab.flush_redis()\n"
        "lab.q.drift_summary([product])"
    ),
    code(
        "fixes['flush'] = lab.reconcile_now(cooldown_s=0)\n{k: fixes['flush'][k] for k in ('full', 'stock', 'reserved', 'carts', 'cleanupQueue')}"
    ),
    md("""## 4 · A broker restart and a database restart, mid-saga
No switch this time: the safeguards are all on, and the question is whether they carry the sagas through
RabbitMQ and then PostgreSQL going away. Restarting a server ends the sessions of everybody using it, so the
lab restarts only servers it started itself: a second lab, `Lab(services='own')`, runs on a PostgreSQL
cluster and a RabbitMQ node of its own (on the shared services, `restart_broker()` refuses).

Shoppers check out one order every `GAP_S` seconds; a slow payment provider keeps sagas in flight. After a few
orders the lab stops its RabbitMQ (for `BROKER_DOWN_S` more seconds), starts it again, then does the same to
PostgreSQL. Nobody tells the server: its relay and consumers find out as any client would."""),
    code(
        "teach.predict('Orders in flight through a broker restart and a database restart: how do they end?', "
        "['all COMPLETED', 'some stuck or lost'], 'restarts', PREDICTIONS)"
    ),
    code(
        "own = Lab(strategy=STRATEGY, outbox_mode=OUTBOX_MODE, services='own').start(tap=False)\n"
        "try:\n    restart = sc.restarts_mid_saga(own, orders=RESTART_ORDERS, gap_s=GAP_S, "
        "broker_down_s=BROKER_DOWN_S, database_down_s=1.0)\nfinally:\n    own.stop()   # its servers and their data go too\n"
        "sc.show_restarts(restart)"
    ),
    md("""Read the chart: while RabbitMQ is down, checkouts still commit (orders placed rises) and their events
wait as outbox rows; settled orders wait too. When it is back, the relay publishes the rows, and a message that
was delivered but not yet acknowledged when the broker stopped arrives a second time: the inboxes absorb such
repeats (`inboxRepeats` below). The database restart rolls back what was in flight (the sampler cannot read
it: the gap) and every session, the relay's included, reconnects."""),
    code(
        "teach.reveal('restarts', 'all COMPLETED' if restart['completed'] == restart['orders'] else 'some stuck or lost')\n"
        "assert restart['completed'] == restart['orders'] and restart['violations'] == [], restart\n"
        "{k: restart[k] for k in ('orders', 'final', 'outboxPeak', 'inboxRepeats', 'refusedRequests', 'violations')}"
    ),
    *finish(
        "05_crash_lost_events_flush",
        """[
    f"After the crash, a pass inside the cooldown fixed {fixes['crash-within-cooldown']['reserved']} reserved key(s); the pass after it fixed {fixes['crash-after-cooldown']['reserved']} reserved and {fixes['crash-after-cooldown']['carts']} cart key(s).",
    f"Lost redis-stock events left stock: {int(lost_drift.stock_drift.fillna(0).abs().sum())} unit(s) off; one pass fixed {fixes['lost-events']['stock']} stock key(s).",
    f"A flush removed {flushed} keys; the next pass was {'a full one' if fixes['flush']['full'] else 'not full'} and rebuilt {fixes['flush']['stock']} stock key(s).",
    f"Through a RabbitMQ restart ({restart['restarts'][0]['outage_s']:.1f} s away) and a PostgreSQL restart ({restart['restarts'][1]['outage_s']:.1f} s), {restart['completed']} of {restart['orders']} orders completed; up to {restart['outboxPeak']} outbox rows waited, the inboxes absorbed {restart['inboxRepeats']} repeat(s), and the checker reported {', '.join(restart['violations']) or 'no violation'}."]""",
        '{"fixes": {k: {f: v[f] for f in ("stock", "reserved", "carts", "cleanupQueue", "deferred", "full")} '
        'for k, v in fixes.items()}, "lostDrift": int(lost_drift.stock_drift.fillna(0).abs().sum()), '
        '"lostOrder": lost_order["displayStatus"], "flushedKeys": flushed, '
        '"finalDrift": lab.q.drift_summary([product]), "restarts": lab.restarts, '
        '"restartsMidSaga": {k: restart[k] for k in ("orders", "completed", "final", "outboxPeak", "inboxRepeats", '
        '"refusedRequests", "restarts", "violations")}}',
    ),
]

NB06 = [
    md("""# 06 · Idempotency and duplicate submits
A shopper double-clicks "Buy", a mobile client retries after a timeout. With one **idempotency key**, any number
of submits create one order: a Redis `lock:{key}` turns concurrent duplicates away with 409, and the
idempotency record, committed with the order, answers every later retry with the first response."""),
    goals(
        "explain how one idempotency key turns many submits into one order",
        "explain why a lock must be released only by its owner, and show what happens otherwise",
        "tell a 409 (retry later) from a stored 200 (the first answer again)",
    ),
    gparams("SUBMITS = 12"),
    code("if SMALL:\n    SUBMITS = 6"),
    code(IMPORTS),
    code("lab = Lab(strategy=STRATEGY, outbox_mode=OUTBOX_MODE).start()"),
    md("## Submits at once, one key"),
    code(
        "teach.predict(f'{SUBMITS} submits of one cart at the same moment, one key: how many orders?', "
        "['1', f'{SUBMITS}', 'somewhere between'], 'same-key', PREDICTIONS)"
    ),
    code(
        "same = sc.duplicate_submits(lab, KINDLE, SUBMITS, same_key=True)\n"
        "teach.reveal('same-key', '1' if same['ordersInDb'] == 1 else f'{SUBMITS}' if same['ordersInDb'] == SUBMITS else 'somewhere between')\n"
        "{k: same[k] for k in ('answers', 'distinctOrders', 'ordersInDb')}"
    ),
    md("## A retry later returns the stored response"),
    code(
        "key = 'retry-' + lab.client.new_user()\nuser = lab.client.new_user()\nlab.client.add_item(user, KINDLE, 1)\n"
        "first = lab.client.checkout(user, key)\nlab.client.wait_settled(first['orderId'])\nagain = lab.client.checkout(user, key)\n"
        "(first['orderId'] == again['orderId'], again)"
    ),
    md("""## The lock and its owner
The lock is `SET lock:{key} <token> NX EX ttl`; the request that took it releases it with this script, which
deletes the key only if it still holds *its own* token — after a slow request's lock expired, another request
may own it now:"""),
    code("_ = teach.lua('release_lock')"),
    md("""`lock-no-owner` deletes the key without looking. The scenario: the lock lives 1 s; order creation is slowed
to 1.2 s (and fails, three times, so the submits keep retrying); three submits of one key arrive together.
`idempotency-lock-exclusive` checks, from the trace of each slow creation, that no request entered while an
earlier one still held the lock."""),
    code(
        "teach.predict('Without the owner check, can two submits of one key be inside order creation at once?', "
        "['no', 'yes'], 'owner', PREDICTIONS)"
    ),
    code(
        "owner = lab.demonstrate('idempotency-lock', 'lock-no-owner', sc.triple_click,\n"
        "                        says='{submits} submits made {ordersCreated} order(s)')\nteach.show(owner, ['submits', 'ordersCreated'])"
    ),
    code("teach.reveal('owner', 'yes' if 'idempotency-lock-exclusive' in owner['off']['violations'] else 'no')"),
    md(
        "## Without a shared key\nEach submit is a new request: whatever the cart still holds when it arrives becomes another order."
    ),
    code(
        "fresh = sc.duplicate_submits(lab, KINDLE, SUBMITS, same_key=False)\n{k: fresh[k] for k in ('answers', 'distinctOrders', 'ordersInDb')}"
    ),
    code(
        "sc.show_bars({'one key': same['ordersInDb'], 'new key each': fresh['ordersInDb']}, "
        "f'Orders created by {SUBMITS} submits of one cart', ylabel='orders')"
    ),
    *finish(
        "06_idempotency_duplicate_submits",
        """[
    f"One key, {SUBMITS} submits at once: answers {same['answers']}, {same['ordersInDb']} order(s) in the database.",
    f"A later retry returned {'the same order' if first['orderId'] == again['orderId'] else 'another order'}.",
    f"A new key per submit: {fresh['ordersInDb']} order(s)."]""",
        '{"sameKey": {k: same[k] for k in ("answers", "distinctOrders", "ordersInDb")}, '
        '"retrySameOrder": first["orderId"] == again["orderId"], "freshKeysOrders": fresh["ordersInDb"]}',
    ),
]

NB07 = [
    md("""# 07 · Load, competing consumers, at-least-once delivery and the inbox
Drive steady load through the API, then give every queue more consumers (competing consumers share one
queue) and compare throughput. RabbitMQ delivers **at least once**: a message normally reaches one consumer of
its queue, but one whose consumer died before acking is delivered again — so every handler must absorb a
duplicate."""),
    goals(
        "measure completed checkouts per second for one and several consumers per queue",
        "explain why delivery is at-least-once, not exactly-once",
        "show what the inbox table prevents when a message is delivered twice",
    ),
    gparams("RATE = 20.0\nDURATION_S = 10\nCONSUMERS = [1, 2]"),
    code("if SMALL:\n    RATE, DURATION_S = 8.0, 3"),
    code(IMPORTS),
    code(
        "from pulse.lab.load import LoadDriver\nlab = Lab(strategy=STRATEGY, outbox_mode=OUTBOX_MODE).start()\n"
        "products = [lab.new_product(stock=100_000, name=f'Bulk {i}') for i in range(4)]\nruns = {}"
    ),
    code(
        "teach.predict('Doubling the consumers per queue at a rate the system keeps up with: completed/s...', "
        "['roughly doubles', 'stays about the same'], 'consumers', PREDICTIONS)"
    ),
    code(
        "for n in CONSUMERS:\n    lab.switch(consumer_threads=n)\n    before = lab.q.outcome_totals().get('COMPLETED', 0)\n"
        "    load = LoadDriver(lambda: lab.url, products, rate=RATE).start()\n    started = time.monotonic()\n"
        "    time.sleep(DURATION_S)\n    counts = load.stop()\n    lab.wait_quiet()\n    elapsed = time.monotonic() - started\n"
        "    done = lab.q.outcome_totals().get('COMPLETED', 0) - before\n"
        "    runs[n] = {'placed': counts['placed'], 'completed': done, 'completedPerS': round(done / elapsed, 2)}\npd.DataFrame(runs).T"
    ),
    code(
        "sc.show_bars({f'{n} consumer(s)': r['completedPerS'] for n, r in runs.items()}, "
        "'Completed checkouts per second', ylabel='orders/s')\n"
        "rates = [r['completedPerS'] for r in runs.values()]\n"
        "teach.reveal('consumers', 'roughly doubles' if rates[-1] > 1.6 * rates[0] else 'stays about the same')"
    ),
    md("""## Two consumers on one stock row: optimistic locking
With two consumers per queue (the last run above), two inventory batches can reserve the same product at the same
moment. Each reads the row's `available_quantity` **and its `version`**, and writes back only if the version is
still the one it read; otherwise it retries with a fresh read. (Each batch also locks its rows up front, in
product order — see `lock_batch`.)"""),
    code("from pulse.inventory import handlers as inventory_handlers\n_ = teach.source(inventory_handlers._take)"),
    md("""`no-version-check` writes back the value it read, minus the order's quantity, with no version condition and no
pre-lock. The `time.sleep(NAIVE_WINDOW_S)` you see in the naive branch widens the read-to-write gap so this
notebook shows the race every time; real databases under load have such gaps without help. The scenario: 8
shoppers' orders of one product, placed at the same moment."""),
    code(
        "teach.predict('Without the version check, 8 orders complete. How many units leave the shelf?', "
        "['8', 'fewer than 8', 'more than 8'], 'version', PREDICTIONS)"
    ),
    code(
        "if lab.settings.consumer_threads < 2:   # so after the load runs above; this cell may also run alone\n"
        "    lab.switch(consumer_threads=2)\n"
        "version = lab.demonstrate('optimistic-locking', 'no-version-check', sc.crowd,\n"
        "                          says='{unitsOrdered} units ordered, {unitsLeftShelf} left the shelf')\n"
        "teach.show(version, ['unitsOrdered', 'unitsLeftShelf'])"
    ),
    code(
        "v = version['off']\nteach.reveal('version', '8' if v['unitsLeftShelf'] == v['unitsOrdered'] else "
        "'fewer than 8' if v['unitsLeftShelf'] < v['unitsOrdered'] else 'more than 8')"
    ),
    md("""## A message that always fails: the dead-letter queue
A handler that throws is retried a few times (`PULSE_HANDLER_RETRIES`, with a short backoff). A message that
fails every attempt — a *poison message* — must not block its queue forever, nor vanish: the consumer copies it,
with the reason, to `<queue>.dlq` (confirmed by the broker) and only then acks the original:"""),
    code("from pulse.infra.consumer import Consumer\n_ = teach.source(Consumer._dead_letter)"),
    md("""`dlq-drop` acks the poison message with no copy. In the scenario the payment provider times out on every
attempt for one order (`payment.timeout`); afterwards a watchdog pass re-drives the order, so it completes in
both runs — the difference is whether anyone can still see and replay what failed. `delivery` checks that every
event reached every module bound to it, or sits in a dead-letter queue."""),
    code(
        "teach.predict('The payment event fails every retry and the consumer drops it. Where is it now?', "
        "['in payment.queue.dlq', 'nowhere'], 'dlq', PREDICTIONS)"
    ),
    code(
        "poison = lab.demonstrate('dead-letter', 'dlq-drop', sc.poison_message,\n"
        "                         says='{attempts} failed attempts, {deadLettered} message(s) in the dead-letter queue, order completed: {completed}')\n"
        "teach.show(poison, ['deadLettered', 'completed'])"
    ),
    code("teach.reveal('dlq', 'in payment.queue.dlq' if poison['off']['deadLettered'] else 'nowhere')"),
    md("""## Delivered twice: the inbox
Every handler claims the event's id in its module's inbox table **in the same transaction** as its effect:"""),
    code("from pulse.infra import inbox\n_ = teach.source(inbox.claim)"),
    md("""`no-inbox` skips the claim. The scenario holds deliveries, hands one order's `ORDER_CREATED` to inventory,
and then hands it over again — what the broker does when a consumer died after its commit and before its ack."""),
    code(
        "teach.predict('Without the inbox, inventory receives ORDER_CREATED for 2 units twice. How many units leave stock?', "
        "['2', '4'], 'inbox', PREDICTIONS)"
    ),
    code(
        "twice = lab.demonstrate('inbox', 'no-inbox', sc.redelivery,\n"
        "                        says='{unitsTaken} units taken for an order of {ordered}')\nlab.release()\n"
        "teach.show(twice, ['unitsTaken', 'ordered'])"
    ),
    code("teach.reveal('inbox', str(twice['off']['unitsTaken']))"),
    *finish(
        "07_load_and_throughput",
        """[
    "Completed per second: " + ", ".join(f"{n} consumer(s) {r['completedPerS']}" for n, r in runs.items()) + f" at an offered {RATE}/s."]""",
        '{"runs": {str(k): v for k, v in runs.items()}}',
    ),
]


REGRESSION = [
    md("""# Checkout regression campaign
Runs one configuration of the system under load (and optionally faults), waits until it is quiet, then
checks every invariant. `pytest -m notebook` runs it for a small matrix; `scripts/run_matrix.sh` for the full one."""),
    params(
        "ORDERS = 60\nCONCURRENCY = 4\nDECLINE_RATE = 0.1\nFAULTS = {}  # e.g. {'consumer.before_ack': 0.05}\n"
        "SEED = 7\nPRODUCTS = 3\nSTOCK_PER_PRODUCT = 15"
    ),
    code("if SMALL:\n    ORDERS, PRODUCTS, STOCK_PER_PRODUCT = 20, 2, 6"),
    code(IMPORTS),
    code(
        "lab = Lab(strategy=STRATEGY, outbox_mode=OUTBOX_MODE, decline_rate=DECLINE_RATE, "
        "env={'PULSE_WATCHDOG_DEADLINE_S': '3', 'PULSE_WATCHDOG_INTERVAL_S': '1', 'PULSE_PAYMENT_SEED': str(SEED)}).start()\n"
        "stock = {lab.new_product(stock=STOCK_PER_PRODUCT, name=f'Regression {i}'): STOCK_PER_PRODUCT for i in range(PRODUCTS)}"
    ),
    code(
        "for name, probability in FAULTS.items():\n    lab.arm(name, probability, seed=SEED)\n"
        "placed = lab.run_orders(ORDERS, list(stock), concurrency=CONCURRENCY, seed=SEED)\nlab.disarm()\n"
        "{k: v for k, v in placed.items() if k != 'orderIds'}"
    ),
    code(
        "quiet = lab.wait_quiet(timeout_s=120)\ninvariants = lab.check(stock)\npd.DataFrame(invariants)[['name', 'ok', 'detail', 'offenders']]"
    ),
    code(
        "outcomes = lab.q.outcome_totals()\ncompensations = lab.q.compensation_totals()\n(outcomes, compensations, lab.restarts)"
    ),
    code("lab.stop()"),
    code(
        'record({"strategy": STRATEGY, "outboxMode": lab.settings.outbox_mode, "faults": FAULTS, "seed": SEED, '
        '"placed": {k: v for k, v in placed.items() if k != "orderIds"}, "outcomes": outcomes, '
        '"compensations": compensations, "restarts": lab.restarts, "invariants": invariants, '
        '"violations": [i["name"] for i in invariants if not i["ok"]]}, RECORD_PATH, notebook="checkout_regression")'
    ),
]

GUIDED = {
    "00_setup_and_tour": NB00,
    "01_one_checkout_both_strategies": NB01,
    "02_lua_vs_naive_oversell": NB02,
    "03_outbox_polling_vs_cdc": NB03,
    "04_compensation_live": NB04,
    "05_crash_lost_events_flush": NB05,
    "06_idempotency_duplicate_submits": NB06,
    "07_load_and_throughput": NB07,
}


def all_notebooks() -> dict[Path, nbformat.NotebookNode]:
    """Every notebook this file generates, by path."""
    out = {HERE / f"{name}.ipynb": notebook(cells) for name, cells in GUIDED.items()}
    out[HERE / "regression" / "checkout_regression.ipynb"] = notebook(REGRESSION)
    for relative, cells in WORKSHOPS.items():
        out[HERE / relative] = notebook(
            [md(c[1]) if c[0] == "md" else params(c[1]) if c[0] == "params" else code(c[1]) for c in cells]
        )
    return out


def main() -> int:
    for path, nb in all_notebooks().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        nbformat.validate(nb)
        nbformat.write(nb, path)
        print(path.relative_to(HERE))
    return 0


if __name__ == "__main__":
    sys.exit(main())
