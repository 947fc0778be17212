"""The saga stepper: hold every delivery and release the events one at a time, showing what each one changed.

While the lab holds deliveries (:meth:`pulse.lab.Lab.hold`), its server answers the API only: nothing relays
the outbox and nothing consumes. The stepper does both jobs in the kernel, the way the relay and the broker
would: it takes the outbox rows (deleting them, as the relay does once the broker confirmed), routes each event
to every queue whose module acts on it (:mod:`pulse.topology`), and hands it to that queue's dispatcher
(:meth:`pulse.bootstrap.System.dispatcher`), the same code a consumer runs. After each delivery it shows which
module acted and which rows and keys changed: the order row, its view, the reservation, the payment, the inbox
rows, the outbox rows it wrote, and the Redis ``stock:``, ``reserved:``, ``cart:`` and hold keys.

>>> stepper = lab.hold()
>>> order = lab.checkout({IPHONE: 1}, wait=False)
>>> lab.step()            # ORDER_CREATED reaches one module; the table shows what it changed
>>> stepper.run()         # the rest of the saga, one event after another
>>> lab.release()         # relay and consumers back
"""

from __future__ import annotations

import json

from pulse import topology
from pulse.events import Envelope
from pulse.infra import keys
from pulse.infra.outbox import envelope_of


class Stepper:
    """Relays and delivers held events one at a time with the lab's in-kernel system (see the module doc)."""

    def __init__(self, lab):
        self.lab = lab
        self.system = lab.system
        self.pending: list[tuple[str, Envelope]] = []
        self.steps: list[dict] = []
        self._seen: dict[str, set[str]] = {}  # order id -> ids of its events the stepper relayed

    # ----- moving events ----------------------------------------------------------------------------

    def collect(self) -> int:
        """Take every outbox row (as the relay would) and queue one delivery per module that acts on it."""
        with self.system.deps.pool.connection() as conn:
            rows = conn.execute("DELETE FROM shared.outbox RETURNING *").fetchall()
        for row in sorted(rows, key=lambda r: r["seq"]):
            env = envelope_of(row)
            self._seen.setdefault(str(env.aggregate_id), set()).add(str(env.id))
            for queue in topology.QUEUES:
                if self.system.dispatcher(queue).wants(env):
                    self.pending.append((queue, env))
        return len(rows)

    def waiting(self):
        """The held deliveries, in the order they would be delivered: queue, event type, order."""
        import pandas as pd

        self.collect()
        return pd.DataFrame(
            [
                {
                    "queue": q,
                    "module": topology.BY_NAME[q].module,
                    "event": e.event_type,
                    "order": str(e.aggregate_id)[:8],
                }
                for q, e in self.pending
            ],
            columns=["queue", "module", "event", "order"],
        )

    def step(
        self, queue: str | None = None, event: str | None = None, *, hold_back=(), show: bool = True
    ) -> dict | None:
        """Deliver the first held event (or the first for ``queue`` and/or ``event`` type, never one for a queue
        in ``hold_back``); returns the step:
        ``{"n", "queue", "module", "event", "order", "acted", "changes": [{"what", "before", "after"}],
        "emitted": [event types written to the outbox]}``, or None when nothing matching waits."""
        self.collect()
        for index, (q, env) in enumerate(self.pending):
            if (queue is None or q == queue) and (event is None or env.event_type == event) and q not in hold_back:
                del self.pending[index]
                return self.deliver(q, env, show=show)
        return None

    def deliver(self, queue: str, env: Envelope, *, show: bool = True, note: str = "") -> dict:
        """Hand ``env`` to ``queue``'s dispatcher now and record what changed."""
        order_id = env.order_id
        before = self.snapshot(order_id)
        dispatcher = self.system.dispatcher(queue)
        error = None
        try:
            dispatcher(env)
        except Exception as exc:  # a handler failure is itself something to see; the consumer would retry
            error = f"{type(exc).__name__}: {exc}"
        after = self.snapshot(order_id)
        with self.system.deps.pool.connection() as conn:
            emitted = [
                r["event_type"]
                for r in conn.execute(
                    "SELECT event_type FROM shared.outbox WHERE aggregate_id = %s ORDER BY seq", (order_id,)
                )
            ]
        step = {
            "n": len(self.steps) + 1,
            "queue": queue,
            "module": topology.BY_NAME[queue].module,
            "event": env.event_type,
            "eventId": str(env.id),
            "order": order_id,
            "acted": not dispatcher.skipped and error is None,
            "note": note,
            "error": error,
            "changes": diff(before, after),
            "emitted": emitted,
        }
        self.steps.append(step)
        self._last = (queue, env)
        if show:
            display_step(step)
        return step

    def redeliver(self, *, show: bool = True) -> dict:
        """Deliver the last delivered event once more to the same queue, as the broker does when a consumer
        died after its handler committed and before its ack (at-least-once delivery)."""
        queue, env = self._last
        return self.deliver(queue, env, show=show, note="redelivered")

    def inject(self, event_type: str, order_id: str, **payload) -> str:
        """Write a late or duplicate saga event for ``order_id`` into the outbox under a new id (as a watchdog's
        re-drive or a slow duplicate would arrive); the next steps deliver it. Returns its id."""
        from pulse.infra import db, outbox

        with db.connect(self.lab.settings.database_url) as conn, conn.transaction():
            order = conn.execute(
                "SELECT user_id::text AS u, strategy, total_amount FROM orders.orders WHERE id = %s", (order_id,)
            ).fetchone()
            items = [
                {"productId": str(r["product_id"]), "quantity": r["quantity"]}
                for r in conn.execute(
                    "SELECT product_id, quantity FROM orders.order_items WHERE order_id = %s", (order_id,)
                )
            ]
            body = {
                "orderId": order_id,
                "userId": order["u"],
                "items": items,
                "strategy": order["strategy"],
                "totalPrice": str(order["total_amount"]),
                **payload,
            }
            return str(outbox.append(conn, event_type, "ORDER", order_id, body))

    def run(self, *, hold_back=(), show: bool = True, max_steps: int = 500) -> list[dict]:
        """Deliver until nothing is held (the rest of every saga in flight) but deliveries to the queues in
        ``hold_back``; returns the steps."""
        done = []
        for _ in range(max_steps):
            step = self.step(hold_back=hold_back, show=False)
            if step is None:
                break
            done.append(step)
        if show and done:
            display_steps(done)
        return done

    # ----- what changed -----------------------------------------------------------------------------

    def snapshot(self, order_id: str) -> dict[str, object]:
        """Every row and key the saga touches for one order, flattened to ``{"what": value}``."""
        state: dict[str, object] = {}
        with self.system.deps.pool.connection() as conn:
            order = conn.execute(
                "SELECT user_id::text AS user_id, status, payment_status, inventory_status, "
                "failure_reason FROM orders.orders WHERE id = %s",
                (order_id,),
            ).fetchone()
            if order is None:
                return state
            for column in ("status", "payment_status", "inventory_status", "failure_reason"):
                state[f"orders.orders.{column}"] = order[column]
            view = conn.execute(
                "SELECT display_status FROM orders.order_views WHERE order_id = %s", (order_id,)
            ).fetchone()
            state["orders.order_views.display_status"] = view and view["display_status"]
            for table, column in (("inventory.reservations", "status"), ("payment.payments", "status")):
                rows = conn.execute(f"SELECT {column} FROM {table} WHERE order_id = %s", (order_id,)).fetchall()
                state[f"{table}.{column}"] = ",".join(str(r[column]) for r in rows) or None
            ids = sorted(self._seen.get(order_id, ()))
            for queue in topology.TOPOLOGY:
                n = conn.execute(
                    f"SELECT count(*) AS n FROM {queue.inbox} WHERE event_id = ANY(%s::uuid[])", (ids,)
                ).fetchone()["n"]
                state[f"{queue.inbox} rows"] = n
            state["shared.outbox rows"] = conn.execute(
                "SELECT count(*) AS n FROM shared.outbox WHERE aggregate_id = %s", (order_id,)
            ).fetchone()["n"]
            products = [
                str(r["product_id"])
                for r in conn.execute(
                    "SELECT product_id FROM orders.order_items WHERE order_id = %s ORDER BY product_id", (order_id,)
                )
            ]
            for r in conn.execute(
                "SELECT product_id::text AS p, available_quantity AS q FROM inventory.inventory_items "
                "WHERE product_id = ANY(%s::uuid[])",
                (products,),
            ):
                state[f"inventory.inventory_items[{r['p'][:8]}].available"] = r["q"]
        r = self.system.deps.redis
        for p in products:
            state[f"redis {keys.stock(p)[:14]}…"] = _text(r.get(keys.stock(p)))
            state[f"redis {keys.reserved(p)[:17]}…"] = _text(r.get(keys.reserved(p)))
        state[f"redis {keys.cart(order['user_id'])[:13]}…"] = _hash(r.hgetall(keys.cart(order["user_id"])))
        state[f"redis {keys.hold(order_id)[:19]}…"] = _hash(r.hgetall(keys.hold(order_id)))
        return state

    # ----- display ----------------------------------------------------------------------------------

    def widget(self):
        """A small control: *Step* delivers the next held event, *Run to the end* the rest; shows each step."""
        import ipywidgets as widgets
        from IPython.display import display

        out = widgets.Output()
        step_button, run_button = widgets.Button(description="Step"), widgets.Button(description="Run to the end")
        status = widgets.HTML()

        def refresh():
            status.value = f"<i>{len(self.waiting())} deliveries held</i>"

        def on_step(_):
            with out:
                if self.step() is None:
                    print("Nothing is held.")
            refresh()

        def on_run(_):
            with out:
                self.run()
            refresh()

        step_button.on_click(on_step)
        run_button.on_click(on_run)
        refresh()
        box = widgets.VBox([widgets.HBox([step_button, run_button, status]), out])
        display(box)
        return box

    def close(self) -> None:
        """Forget what is held (the outbox rows are gone; :meth:`pulse.lab.Lab.release` delivers them first)."""
        self.pending.clear()


def _text(value):
    return None if value is None else value.decode() if isinstance(value, bytes) else value


def _hash(values: dict) -> str | None:
    if not values:
        return None
    return json.dumps({_text(k)[:8]: _text(v) for k, v in sorted(values.items())}, sort_keys=True)


def diff(before: dict, after: dict) -> list[dict]:
    """The entries of two snapshots that differ: ``[{"what", "before", "after"}]``."""
    return [
        {"what": k, "before": before.get(k), "after": after.get(k)}
        for k in dict.fromkeys([*before, *after])
        if before.get(k) != after.get(k)
    ]


def step_markdown(step: dict) -> str:
    """One step as Markdown: who acted on what, then a table of what changed."""
    who = f"**{step['n']}. {step['module']}** ({step['queue']}) ← `{step['event']}`"
    if step.get("note"):
        who += f" *({step['note']})*"
    who += f" for order {step['order'][:8]}"
    if step.get("error"):
        who += f" — the handler failed: {step['error']}"
    elif not step["acted"]:
        who += " — not acted on"
    rows = "\n".join(f"| {c['what']} | {c['before']} | {c['after']} |" for c in step["changes"])
    table = "\n| changed | before | after |\n|---|---|---|\n" + rows if rows else "\n*nothing changed*"
    emitted = f"\n\nwrote to the outbox: {', '.join(step['emitted'])}" if step["emitted"] else ""
    return who + "\n" + table + emitted


def display_step(step: dict) -> None:
    """Show one step (Markdown in a notebook, text elsewhere)."""
    from pulse.lab.teach import _say

    _say(step_markdown(step))


def display_steps(steps: list[dict]) -> None:
    """Show several steps one after another."""
    from pulse.lab.teach import _say

    _say("\n\n".join(step_markdown(s) for s in steps))
