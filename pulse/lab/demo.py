"""The README's main job: the system up, seeded, and a checkout through every saga path, outcomes printed."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from pulse import config
from pulse.infra import db, migrate
from pulse.lab.client import PulseClient
from pulse.seed import IPHONE, KINDLE
from pulse.tools.launcher import ServeProcess


def _stock(client, product_id) -> int:
    return next(p["stock"] for p in client.products() if p["id"] == product_id)


def _happy(client, out) -> dict:
    user = client.new_user()
    client.add_item(user, IPHONE, 1)
    order = client.wait_settled(client.checkout(user)["orderId"])
    out(f"    happy path      -> {order['status']:<9} display={order['displayStatus']}")
    return order


def _declined(client, out) -> dict:
    user = client.new_user()
    before = _stock(client, KINDLE)
    client.add_item(user, KINDLE, 2)
    order = client.wait_settled(client.checkout(user)["orderId"])
    after = _stock(client, KINDLE)
    out(
        f"    card declined   -> {order['status']:<9} reason={order['failureReason']} "
        f"inventory={order['inventoryStatus']} (stock {before}, reserved 2, restocked to {after})"
    )
    return order


def _out_of_stock(client, out, database_url) -> dict:
    product = client.create_product("Demo Limited Edition", 10.0, 1)
    user = client.new_user()
    client.add_item(user, product["id"], 1)
    # The warehouse finds the last unit damaged after the cart reserved it: the database says 0 now.
    with db.connect(database_url) as conn:
        conn.execute(
            "UPDATE inventory.inventory_items SET available_quantity = 0, version = version + 1, "
            "updated_at = now() WHERE product_id = %s",
            (product["id"],),
        )
    order = client.wait_settled(client.checkout(user)["orderId"])
    out(
        f"    out of stock    -> {order['status']:<9} reason={order['failureReason']} "
        f"payment={order['paymentStatus']} display={order['displayStatus']} (charged, then refunded)"
    )
    return order


def run_demo(outbox_mode: str | None = None, out=print) -> int:
    """Run every saga path against real services; returns 0 when each ended as the saga says it must."""
    settings = config.from_env()
    mode = outbox_mode or settings.outbox_mode
    migrate.migrate(settings.database_url)
    migrate.seed(settings.database_url, reset=True)
    out(f"Checkout Pulse demo (outbox relay: {mode}); database, Redis and RabbitMQ as configured.")
    expected = []
    log_dir = Path(tempfile.mkdtemp(prefix="pulse-demo-"))
    runs = [
        ("optimistic", "0", lambda c: [_happy(c, out)]),
        ("optimistic", "1", lambda c: [_declined(c, out)]),
        ("post-payment", "0", lambda c: [_happy(c, out), _out_of_stock(c, out, settings.database_url)]),
    ]
    for strategy, decline, scenario in runs:
        out(f"  strategy {strategy} (payment decline rate {decline}):")
        server = ServeProcess(
            strategy=strategy,
            outbox_mode=mode,
            env={"PULSE_PAYMENT_DECLINE_RATE": decline},
            log_path=log_dir / f"serve-{strategy}-{decline}.log",
        )
        with server:
            client = PulseClient(server.url)
            try:
                expected += scenario(client)
            finally:
                client.close()
    if mode == "cdc":
        # A slot nobody reads keeps every byte of WAL from now on (the disk fills); the demo is over,
        # so give it back. The next `pulse serve` creates it again and publishes any row still in the outbox.
        from pulse.infra import cdc_slot

        with db.connect(settings.database_url, autocommit=True) as conn:
            cdc_slot.drop(conn, settings.cdc_slot)
    wanted = ["COMPLETED", "FAILED_PAYMENT", "COMPLETED", "REFUNDED"]
    got = [o["displayStatus"] for o in expected]
    ok = got == wanted
    out(
        ("All saga paths ended as expected." if ok else f"Unexpected outcomes: {got}, wanted {wanted}.")
        + f"\nServer logs: {log_dir}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(run_demo())
