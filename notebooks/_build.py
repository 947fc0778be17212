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

KERNEL = {"kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"},
          "language_info": {"name": "python"}}

COMMON_PARAMS = '''STRATEGY = "optimistic"     # or "post-payment"
OUTBOX_MODE = None          # None: PULSE_OUTBOX_MODE (or the default); "polling" or "cdc"
SMALL = False               # True: tiny sizes, for CI
RECORD_PATH = None          # where the last cell writes its results as JSON (None: $PULSE_LAB_RECORD_DIR)'''

IMPORTS = '''import time
import pandas as pd
from pulse.lab import Lab, record, IPHONE, AIRPODS, MACBOOK, KINDLE
from pulse.lab import scenarios as sc'''


def md(text: str):
    return new_markdown_cell(text.strip())


def code(text: str):
    return new_code_cell(text.strip())


def params(extra: str = ""):
    cell = new_code_cell((COMMON_PARAMS + ("\n" + extra.strip() if extra else "")).strip())
    cell.metadata["tags"] = ["parameters"]
    return cell


def finish(name: str, summary: str, results: str):
    return [md("## What you saw\n" + summary.strip()),
            code("lab.stop()   # stops the dashboard, the event tap and the server; also done at exit"),
            code(f'record({results.strip()}, RECORD_PATH, notebook="{name}")')]


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
Every helper used here has a docstring: try `Lab?` or `sc.concurrent_adds?`."""),
    params("ORDERS = 30"),
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
Adding an item runs `reserve_stock.lua`: it checks `stock:{id} − reserved:{id}` and increments `reserved:`
in one atomic step. The cart itself is the hash `cart:{user}`; `cart:cleanup:queue` remembers when it expires."""),
    code("user = lab.client.new_user()\nlab.client.add_item(user, IPHONE, 1)\n"
         "r = lab.redis()\nsorted(k for k in r.scan_iter(match='*') if k.split(':')[0] in ('stock', 'reserved', 'cart'))"),
    code("{'stock': r.get(f'stock:{IPHONE}'), 'reserved': r.get(f'reserved:{IPHONE}'), 'cart': r.hgetall(f'cart:{user}')}"),
    md("## The broker: one exchange, five queues\nEach queue is bound to every event its module may react to, "
       "for orders of either strategy. Which events a module acts on depends on the order's strategy, "
       "recorded with the order (`pulse/topology.py` declares it all in one table):"),
    code("from pulse import topology\n"
         "pd.DataFrame([(q, ', '.join(events)) for q, events in "
         "topology.handled_events(lab.settings.strategy_name).items()], columns=['queue', 'events'])"),
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
    code("placed = lab.run_orders(ORDERS, [IPHONE, AIRPODS, KINDLE], concurrency=4)\nlab.wait_quiet()\n"
         "summary = dash.render()\nsummary"),
    *finish("00_setup_and_tour", """
- The three services and the one `pulse serve` process the lab supervises.
- Redis holds the hot cart state (`stock:`, `reserved:`, `cart:`), PostgreSQL the truth, RabbitMQ the events.
- One order's events travelled outbox → broker → inboxes; the dashboard counted every order to its end.""",
            '{"services": services, "orderStatus": order["displayStatus"], "placed": placed["placed"], '
            '"summary": summary, "stages": sorted(set(timeline["stage"]))}'),
]

NB01 = [
    md("""# 01 · One checkout through the saga, both strategies
**Optimistic**: reserve stock first, then charge. **Post-payment**: charge first, then reserve.
Same events, different order — and different compensations when something fails (see notebook 04)."""),
    params(),
    code(IMPORTS),
    code("lab = Lab(strategy='optimistic', outbox_mode=OUTBOX_MODE).start()\norders = {}"),
    md("## Optimistic: ORDER_CREATED → STOCK_RESERVED → PAYMENT_PROCESSED → COMPLETED"),
    code("orders['optimistic'] = lab.checkout({IPHONE: 1})\n"
         "optimistic = sc.show_sequence(lab, orders['optimistic']['orderId'], 'optimistic')"),
    md("Read the broker lane top to bottom: which module reacted to which event, and in what order?"),
    code("optimistic[optimistic.stage == 'broker'][['eventType', 'at']]"),
    md("## Post-payment: ORDER_CREATED → PAYMENT_PROCESSED → STOCK_RESERVED → COMPLETED\n"
       "`switch` restarts the server; new orders take the new strategy, orders in flight finish under their own."),
    code("lab.switch(strategy='post-payment')\norders['post-payment'] = lab.checkout({IPHONE: 1})\n"
         "post = sc.show_sequence(lab, orders['post-payment']['orderId'], 'post-payment')"),
    code("post[post.stage == 'broker'][['eventType', 'at']]"),
    md("## Both orders, as the API and the CQRS view report them"),
    code("pd.DataFrame(orders).T[['status', 'displayStatus', 'paymentStatus', 'inventoryStatus', 'strategy']]"),
    *finish("01_one_checkout_both_strategies", """
- Under **optimistic**, inventory reacted to `ORDER_CREATED` and payment to `STOCK_RESERVED`.
- Under **post-payment**, payment went first and inventory reacted to `PAYMENT_PROCESSED`.
- Each order records the strategy it ran under; the view (`displayStatus`) caught up with both.""",
            '{s: {"status": o["displayStatus"], "strategy": o["strategy"]} for s, o in orders.items()} | '
            '{"events": {"optimistic": list(optimistic[optimistic.stage == "broker"].eventType), '
            '"post-payment": list(post[post.stage == "broker"].eventType)}}'),
]

NB02 = [
    md("""# 02 · Atomic reservation: Redis Lua vs the naive GET/SET race
Many shoppers add the last units at the same moment. The Lua script checks and reserves in **one** step.
The naive version reads `stock` and `reserved`, decides, then writes: two requests can both read
"one left" and both reserve it. Here you watch that oversell happen, then disappear."""),
    params("STOCK = 10\nSHOPPERS = 40"),
    code("if SMALL:\n    STOCK, SHOPPERS = 5, 24"),
    code(IMPORTS),
    code("lab = Lab(strategy=STRATEGY, outbox_mode=OUTBOX_MODE).start()"),
    md("## Naive: GET, decide, SET\nThe `reserve-get-set` switch replaces the Lua script with three separate commands."),
    code("lab.switch(naive={'reserve-get-set'})\nnaive_product = lab.new_product(stock=STOCK, name='Naive GET/SET')\n"
         "naive = sc.concurrent_adds(lab, naive_product, SHOPPERS)\n"
         "{k: v for k, v in naive.items() if k != 'users'}"),
    md("More carts were accepted than there are units. Redis now promises stock that does not exist:"),
    code("sc.show_drift(lab, [naive_product], 'After the naive race')"),
    md("PostgreSQL is the last line of defence: the saga's inventory step never goes below zero, "
       "so the surplus orders fail with OUT_OF_STOCK — the shopper was told *yes* and then *no*."),
    code("naive_orders = sc.checkout_all(lab, naive['users'])\nnaive_orders.displayStatus.value_counts()"),
    md("## Lua: one atomic step"),
    code("lab.switch(naive=())\nlua_product = lab.new_product(stock=STOCK, name='Lua script')\n"
         "lua = sc.concurrent_adds(lab, lua_product, SHOPPERS)\n{k: v for k, v in lua.items() if k != 'users'}"),
    code("lua_orders = sc.checkout_all(lab, lua['users'])\nlua_orders.displayStatus.value_counts()"),
    code("sc.show_bars({'naive GET/SET': naive['accepted'], 'Lua': lua['accepted']}, "
         "'Carts accepted for the same stock', ylabel='carts', line=STOCK, line_label='units in stock')"),
    *finish("02_lua_vs_naive_oversell", """
- With GET/SET, more carts than units were accepted (an oversell in Redis); the saga then failed the surplus.
- With the Lua script, exactly the stock was accepted and every accepted cart completed.
- Atomicity belongs where the contention is: one script, one round trip, no window.""",
            '{"stock": STOCK, "shoppers": SHOPPERS, "naiveAccepted": naive["accepted"], '
            '"luaAccepted": lua["accepted"], '
            '"naiveCompleted": int((naive_orders.displayStatus == "COMPLETED").sum()), '
            '"luaCompleted": int((lua_orders.displayStatus == "COMPLETED").sum())}'),
]

NB03 = [
    md("""# 03 · The transactional outbox: polling vs WAL CDC, and what a lost message looks like
Every change writes its events into `shared.outbox` **in the same transaction**. A relay publishes them:
**polling** reads the table; **CDC** reads PostgreSQL's write-ahead log. Both publish with confirms and
forget a row only after the broker confirmed it, so a crash gives duplicates (absorbed by inboxes), never losses."""),
    params("ORDERS = 40\nWATCHDOG_DEADLINE_S = 2"),
    code("if SMALL:\n    ORDERS = 10"),
    code(IMPORTS),
    code("lab = Lab(strategy=STRATEGY, outbox_mode='polling', env={'PULSE_WATCHDOG_DEADLINE_S': str(WATCHDOG_DEADLINE_S), "
         "'PULSE_WATCHDOG_INTERVAL_S': '1'}).start()\nlatency = {}"),
    md("## Polling: commit → broker latency"),
    code("mark = len(lab.tap.events)\nlab.run_orders(ORDERS, [IPHONE, KINDLE])\nlab.wait_quiet()\n"
         "latency['polling'] = sc.publish_latency(lab, since=mark)\nlatency['polling'].latency_ms.describe()"),
    md("""## A crash right after publishing
`relay.after_publish` kills the server after the broker took the batch but before the outbox rows were
deleted. The supervisor restarts it; the new relay publishes the same rows again. Count the duplicates
the inboxes absorbed — and check the order still completed exactly once."""),
    code("before = sc.inbox_duplicates(lab)\nlab.arm('relay.after_publish', 1.0, max=1)\n"
         "crashed_order = lab.checkout({KINDLE: 1}, wait=False)\nlab.wait_up()\nlab.disarm('relay.after_publish')\n"
         "crashed_order = lab.client.wait_settled(crashed_order['orderId'])\n"
         "after = sc.inbox_duplicates(lab)\n{'restarts': lab.restarts, 'order': crashed_order['displayStatus'], "
         "'duplicatesAbsorbed': {m: after[m] - before.get(m, 0) for m in after}}"),
    md("""## What a lost message looks like
The outbox makes a *lost publish* impossible, but a message can still vanish after the broker: here
`consumer.lose` acks one `order.queue` message without handling it. The order stalls — its sequence chart
has a hop missing — until the saga watchdog notices the silence and re-drives the missing step from the
database (after `WATCHDOG_DEADLINE_S`)."""),
    code("lab.arm('consumer.lose', 1.0, queue='order.queue', max=1)\nlost = lab.checkout({IPHONE: 1}, wait=False)\n"
         "time.sleep(1)\nstalled = lab.client.order(lost['orderId'])\nlab.disarm('consumer.lose')\n"
         "stalled['status']"),
    code("lost = lab.client.wait_settled(lost['orderId'], timeout_s=60)\n"
         "lost_timeline = sc.show_sequence(lab, lost['orderId'], 'one event lost, then re-driven')\nlost['displayStatus']"),
    md("## CDC: the same load read from the WAL"),
    code("from pulse.lab.lab import cdc_available\nif cdc_available():\n    lab.switch(outbox_mode='cdc')\n"
         "    mark = len(lab.tap.events)\n    lab.run_orders(ORDERS, [IPHONE, KINDLE])\n    lab.wait_quiet()\n"
         "    latency['cdc'] = sc.publish_latency(lab, since=mark)\nelse:\n    print('This checkout has no CDC relay.')"),
    code("table = pd.DataFrame({mode: df.latency_ms.quantile([0.5, 0.9, 0.99]) for mode, df in latency.items()})\n"
         "table.index = ['p50 ms', 'p90 ms', 'p99 ms']\ntable"),
    code("sc.show_bars({m: float(df.latency_ms.quantile(0.99)) for m, df in latency.items()}, "
         "'commit → broker p99 (ms)', ylabel='ms')"),
    *finish("03_outbox_polling_vs_cdc", """
- Both relays moved every event; their commit → broker latencies differ (table above).
- A crash after publishing produced **duplicates**, which the inboxes absorbed: the order completed once.
- A message lost after the broker stalled one order until the watchdog re-drove it from the database.""",
            '{"latencyP99Ms": {m: round(float(df.latency_ms.quantile(0.99)), 2) for m, df in latency.items()}, '
            '"events": {m: len(df) for m, df in latency.items()}, "restarts": lab.restarts, '
            '"crashedOrder": crashed_order["displayStatus"], "lostOrderStalled": stalled["status"], '
            '"lostOrder": lost["displayStatus"]}'),
]

NB04 = [
    md("""# 04 · Compensation: declined cards and out-of-stock, charted live
A saga has no rollback; each failure is undone by a **compensating** step.
Optimistic: a declined card → `PAYMENT_FAILED` → inventory **restocks**. Post-payment: out of stock after the
charge → `STOCK_FAILED` → payment **refunds**. Watch both counters climb in the dashboard."""),
    params("ORDERS = 40\nDECLINE_RATE = 0.3\nSCARCE_STOCK = 3"),
    code("if SMALL:\n    ORDERS = 12"),
    code(IMPORTS),
    code("lab = Lab(strategy='optimistic', outbox_mode=OUTBOX_MODE, decline_rate=DECLINE_RATE).start()\n"
         "dash = lab.dashboard()\ndash.show()"),
    md("## Optimistic with a declining card provider\nEvery declined payment must give its reserved units back."),
    code("lab.run_orders(ORDERS, [IPHONE, AIRPODS, KINDLE])\nlab.wait_quiet()\nlab.q.compensation_totals()"),
    md("""## Post-payment with a scarce product
Carts release their Redis hold when the order is created, so more orders than units can reach the charge.
The surplus is charged, fails to reserve, and is **refunded**. One more order loses its unit to the warehouse
(damaged stock) after it was charged — a refund every time."""),
    code("lab.switch(strategy='post-payment', decline_rate=0.0)\nscarce = lab.new_product(stock=SCARCE_STOCK, name='Limited edition')\n"
         "lab.run_orders(max(ORDERS // 2, 2 * SCARCE_STOCK), [scarce], concurrency=4)\nlab.wait_quiet()"),
    md("Every invariant should hold: no stock lost, every charge either completed an order or was refunded."),
    code("checks = pd.DataFrame(lab.check())\nchecks[['name', 'ok', 'detail']]"),
    code("damaged = lab.new_product(stock=1, name='Last unit')\nuser = lab.client.new_user()\nlab.client.add_item(user, damaged, 1)\n"
         "lab.execute('UPDATE inventory.inventory_items SET available_quantity = 0, version = version + 1, '\n"
         "            'updated_at = now() WHERE product_id = %s', (damaged,))   # the warehouse finds it broken\n"
         "refunded = lab.client.wait_settled(lab.client.checkout(user)['orderId'])\nrefunded['displayStatus']"),
    code("summary = dash.render()"),

    *finish("04_compensation_live", """
- Declined payments were followed by restocks (`inventory.reservations` → RELEASED): no units leaked.
- Post-payment orders that could not be reserved were refunded (`payment.payments` → REFUNDED).
- The money invariant held: what was charged and not refunded equals the totals of completed orders.""",
            '{"compensations": summary["compensations"], "outcomes": summary["outcomes"], '
            '"refundedOrder": refunded["displayStatus"], '
            '"violations": [c["name"] for c in checks.to_dict("records") if not c["ok"]]}'),
]

NB05 = [
    md("""# 05 · Crash between Redis and the DB, lost events, a Redis flush — and reconciliation
Redis and PostgreSQL are two systems with no shared transaction. Three ways they drift apart, each charted,
and the **reconciler** that repairs Redis from PostgreSQL (the truth)."""),
    params("COOLDOWN_S = 10\nORDERS = 20"),
    code("if SMALL:\n    COOLDOWN_S, ORDERS = 6, 6"),
    code(IMPORTS),
    code("lab = Lab(strategy=STRATEGY, outbox_mode=OUTBOX_MODE).start()\nproduct = lab.new_product(stock=50, name='Drift demo')\n"
         "lab.reconcile_now(cooldown_s=0)   # a baseline: the first run covers everything\nfixes = {}"),
    md("""## 1 · A crash between the Redis reservation and the DB commit
`cart.after_redis` kills the server after Redis reserved the unit and before PostgreSQL saved the cart.
Redis now holds a reservation nobody will ever order or release."""),
    code("lab.arm('cart.after_redis', 1.0, max=1)\nghost = lab.client.new_user()\ntry:\n    lab.client.add_item(ghost, product, 2)\n"
         "except Exception as exc:\n    print('the server died mid-request:', type(exc).__name__)\nlab.wait_up()\n"
         "sc.show_drift(lab, [product], 'after the crash')"),
    md(f"""## The cooldown window
The reconciler does not touch rows changed in the last `COOLDOWN_S` seconds: a request in flight has
already written Redis but not yet committed PostgreSQL, and "repairing" it would undo a correct reservation.
So a pass right now leaves the fresh ghost cart alone (it is inside the window); once the cooldown has passed,
the next pass sees it and removes it."""),
    code("fixes['crash-within-cooldown'] = lab.reconcile_now(cooldown_s=COOLDOWN_S)\nlab.disarm('cart.after_redis')\n"
         "{k: fixes['crash-within-cooldown'][k] for k in ('reserved', 'carts', 'deferred', 'windowTo')}"),
    code("time.sleep(COOLDOWN_S + 0.5)\nfixes['crash-after-cooldown'] = lab.reconcile_now(cooldown_s=COOLDOWN_S)\n"
         "sc.show_drift(lab, [product], 'after reconciliation')"),
    md("""## 2 · Lost events
First some ordinary orders: each one's `STOCK_RESERVED` also reaches `redis-stock.queue`, which refreshes
`stock:` from the database. Then `consumer.lose` acks the next two `redis-stock.queue` messages without
handling them — one order's `ORDER_CREATED` and `STOCK_RESERVED`. The order itself completes, but Redis
still promises the units PostgreSQL has handed out (`stock:` too high), and the cart is not cleared
(the saga watchdog re-drives that later; the reconciler sees DB and Redis agree on the cart)."""),
    code("lab.run_orders(ORDERS, [product])\nlab.wait_quiet()\n"
         "lab.arm('consumer.lose', 1.0, queue='redis-stock.queue', max=2)\n"
         "lost_order = lab.checkout({product: 3})\nlab.disarm('consumer.lose')\n"
         "lost_drift = sc.show_drift(lab, [product], 'after lost redis-stock events')\nlost_drift"),
    code("fixes['lost-events'] = lab.reconcile_now(cooldown_s=0)\nsc.show_drift(lab, [product], 'after reconciliation')"),
    md("""## 3 · Redis loses everything
A Redis restart without persistence: every `stock:`, `reserved:` and `cart:` key is gone — including the
reconciler's marker, so the next pass knows it must cover everything, not just the recent delta."""),
    code("user = lab.client.new_user()\nlab.client.add_item(user, product, 1)\nflushed = lab.flush_redis()\n"
         "lab.q.drift_summary([product])"),
    code("fixes['flush'] = lab.reconcile_now(cooldown_s=0)\n{k: fixes['flush'][k] for k in ('full', 'stock', 'reserved', 'carts', 'cleanupQueue')}"),
    code("dash = lab.dashboard(products=[product, IPHONE, KINDLE])\nsummary = dash.render()"),
    *finish("05_crash_lost_events_flush", """
- A crash between Redis and PostgreSQL left a ghost reservation; the first pass left it alone (inside the
  cooldown window), the pass after the cooldown removed it.
- Lost `redis-stock` events left a stale `stock:` value (Redis promised sold units); one pass repaired it.
- A flushed Redis lost every key and the reconciler's marker, so the next pass was a full one and rebuilt it all.""",
            '{"fixes": {k: {f: v[f] for f in ("stock", "reserved", "carts", "cleanupQueue", "deferred", "full")} '
            'for k, v in fixes.items()}, "lostDrift": int(lost_drift.stock_drift.fillna(0).abs().sum()), '
            '"lostOrder": lost_order["displayStatus"], "flushedKeys": flushed, '
            '"finalDrift": lab.q.drift_summary([product]), "restarts": lab.restarts}'),
]

NB06 = [
    md("""# 06 · Idempotency and duplicate submits
A shopper double-clicks "Buy", a mobile client retries after a timeout. With one **idempotency key**, any number
of submits create one order: a Redis `lock:{key}` (SETNX, 10 s) turns concurrent duplicates away with 409, and the
idempotency record, committed with the order, answers every later retry with the first response."""),
    params("SUBMITS = 12"),
    code(IMPORTS),
    code("lab = Lab(strategy=STRATEGY, outbox_mode=OUTBOX_MODE).start()"),
    md("## Twelve submits at once, one key"),
    code("same = sc.duplicate_submits(lab, KINDLE, SUBMITS, same_key=True)\n{k: same[k] for k in ('answers', 'distinctOrders', 'ordersInDb')}"),
    md("## A retry later returns the stored response"),
    code("key = 'retry-' + lab.client.new_user()\nuser = lab.client.new_user()\nlab.client.add_item(user, KINDLE, 1)\n"
         "first = lab.client.checkout(user, key)\nlab.client.wait_settled(first['orderId'])\nagain = lab.client.checkout(user, key)\n"
         "(first['orderId'] == again['orderId'], again)"),
    md("## Without a shared key\nEach submit is a new request: whatever the cart still holds when it arrives becomes another order."),
    code("fresh = sc.duplicate_submits(lab, KINDLE, SUBMITS, same_key=False)\n{k: fresh[k] for k in ('answers', 'distinctOrders', 'ordersInDb')}"),
    code("sc.show_bars({'one key': same['ordersInDb'], 'new key each': fresh['ordersInDb']}, "
         "f'Orders created by {SUBMITS} submits of one cart', ylabel='orders')"),
    *finish("06_idempotency_duplicate_submits", """
- With one key, concurrent submits got 200 (the same order) or 409 (retry later); one order was created.
- A later retry returned the stored response without creating anything.
- Without a shared key, duplicates can become several orders: the key is the client's promise, keep it.""",
            '{"sameKey": {k: same[k] for k in ("answers", "distinctOrders", "ordersInDb")}, '
            '"retrySameOrder": first["orderId"] == again["orderId"], "freshKeysOrders": fresh["ordersInDb"]}'),
]

NB07 = [
    md("""# 07 · Load, competing consumers and throughput
Drive steady load through the API, then give every queue more consumers (competing consumers share one
queue: each message goes to exactly one of them) and compare throughput and relay lag."""),
    params("RATE = 20.0\nDURATION_S = 10\nCONSUMERS = [1, 2]"),
    code("if SMALL:\n    RATE, DURATION_S = 8.0, 3"),
    code(IMPORTS),
    code("from pulse.lab.load import LoadDriver\nlab = Lab(strategy=STRATEGY, outbox_mode=OUTBOX_MODE).start()\n"
         "products = [lab.new_product(stock=100_000, name=f'Bulk {i}') for i in range(4)]\nruns = {}"),
    code("dash = lab.dashboard(products=products)\ndash.show()"),
    code("for n in CONSUMERS:\n    lab.switch(consumer_threads=n)\n    before = lab.q.outcome_totals().get('COMPLETED', 0)\n"
         "    load = LoadDriver(lambda: lab.url, products, rate=RATE).start()\n    started = time.monotonic()\n"
         "    time.sleep(DURATION_S)\n    counts = load.stop()\n    lab.wait_quiet()\n    elapsed = time.monotonic() - started\n"
         "    done = lab.q.outcome_totals().get('COMPLETED', 0) - before\n"
         "    runs[n] = {'placed': counts['placed'], 'completed': done, 'completedPerS': round(done / elapsed, 2)}\npd.DataFrame(runs).T"),
    code("sc.show_bars({f'{n} consumer(s)': r['completedPerS'] for n, r in runs.items()}, "
         "'Completed checkouts per second', ylabel='orders/s')"),
    code("summary = dash.render()"),
    md("Try it live: set the dashboard's *orders/s* slider higher and watch the relay-lag panel. "
       "Where does the system stop keeping up on this machine?"),
    *finish("07_load_and_throughput", """
- At a rate the system keeps up with, completed/s follows the offered rate, whatever the consumer count.
- More consumers per queue help once handlers are the bottleneck (several in flight per queue);
  the relay-lag panel shows when the outbox, not the consumers, is what falls behind.""",
            '{"runs": {str(k): v for k, v in runs.items()}, "summary": summary}'),
]

REGRESSION = [
    md("""# Checkout regression campaign
Runs one configuration of the system under load (and optionally faults), waits until it is quiet, then
checks every invariant. `pytest -m notebook` runs it for a small matrix; `scripts/run_matrix.sh` for the full one."""),
    params("ORDERS = 60\nCONCURRENCY = 4\nDECLINE_RATE = 0.1\nFAULTS = {}  # e.g. {'consumer.before_ack': 0.05}\n"
           "SEED = 7\nPRODUCTS = 3\nSTOCK_PER_PRODUCT = 15"),
    code("if SMALL:\n    ORDERS, PRODUCTS, STOCK_PER_PRODUCT = 20, 2, 6"),
    code(IMPORTS),
    code("lab = Lab(strategy=STRATEGY, outbox_mode=OUTBOX_MODE, decline_rate=DECLINE_RATE, "
         "env={'PULSE_WATCHDOG_DEADLINE_S': '3', 'PULSE_WATCHDOG_INTERVAL_S': '1', 'PULSE_PAYMENT_SEED': str(SEED)}).start()\n"
         "stock = {lab.new_product(stock=STOCK_PER_PRODUCT, name=f'Regression {i}'): STOCK_PER_PRODUCT for i in range(PRODUCTS)}"),
    code("for name, probability in FAULTS.items():\n    lab.arm(name, probability, seed=SEED)\n"
         "placed = lab.run_orders(ORDERS, list(stock), concurrency=CONCURRENCY, seed=SEED)\nlab.disarm()\n"
         "{k: v for k, v in placed.items() if k != 'orderIds'}"),
    code("quiet = lab.wait_quiet(timeout_s=120)\ninvariants = lab.check(stock)\npd.DataFrame(invariants)[['name', 'ok', 'detail', 'offenders']]"),
    code("outcomes = lab.q.outcome_totals()\ncompensations = lab.q.compensation_totals()\n(outcomes, compensations, lab.restarts)"),
    code("lab.stop()"),
    code('record({"strategy": STRATEGY, "outboxMode": lab.settings.outbox_mode, "faults": FAULTS, "seed": SEED, '
         '"placed": {k: v for k, v in placed.items() if k != "orderIds"}, "outcomes": outcomes, '
         '"compensations": compensations, "restarts": lab.restarts, "invariants": invariants, '
         '"violations": [i["name"] for i in invariants if not i["ok"]]}, RECORD_PATH, notebook="checkout_regression")'),
]

GUIDED = {"00_setup_and_tour": NB00, "01_one_checkout_both_strategies": NB01, "02_lua_vs_naive_oversell": NB02,
          "03_outbox_polling_vs_cdc": NB03, "04_compensation_live": NB04, "05_crash_lost_events_flush": NB05,
          "06_idempotency_duplicate_submits": NB06, "07_load_and_throughput": NB07}


def all_notebooks() -> dict[Path, nbformat.NotebookNode]:
    """Every notebook this file generates, by path."""
    out = {HERE / f"{name}.ipynb": notebook(cells) for name, cells in GUIDED.items()}
    out[HERE / "regression" / "checkout_regression.ipynb"] = notebook(REGRESSION)
    for relative, cells in WORKSHOPS.items():
        out[HERE / relative] = notebook([md(c[1]) if c[0] == "md" else params(c[1]) if c[0] == "params"
                                         else code(c[1]) for c in cells])
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
