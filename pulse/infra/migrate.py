"""Apply the ordered, re-runnable SQL files of ``sql/`` and load the seed catalogue."""

from __future__ import annotations

import logging
from pathlib import Path

from pulse.config import PROJECT_ROOT, Settings
from pulse.infra import db
from pulse.seed import SEED_PRODUCTS

log = logging.getLogger(__name__)
SQL_DIR = PROJECT_ROOT / "sql"


def sql_files(directory: Path = SQL_DIR) -> list[Path]:
    """The migration files in the order they are applied (by file name)."""
    return sorted(directory.glob("*.sql"))


def migrate(url: str, directory: Path = SQL_DIR, *, settings: Settings | None = None) -> list[str]:
    """Create the database if missing and apply every SQL file; safe to run any number of times.

    With ``settings`` in cdc outbox mode, also create the configured publication and replication slot (the
    slot only then: an unread slot keeps WAL forever, so polling mode and test sessions never get one).
    """
    db.ensure_database(url)
    applied = []
    with db.connect(url, autocommit=True) as conn:
        # Two migrators at once (two `pulse serve` starting together) would race on CREATE IF NOT EXISTS.
        conn.execute("SELECT pg_advisory_lock(hashtext('pulse.migrate'))")
        try:
            for path in sql_files(directory):
                with conn.transaction():
                    conn.execute(path.read_text())
                applied.append(path.name)
        finally:
            conn.execute("SELECT pg_advisory_unlock(hashtext('pulse.migrate'))")
    log.info("applied %d migration files", len(applied))
    if settings is not None and settings.outbox_mode == "cdc":
        from pulse.infra import relay_cdc  # only cdc mode needs it

        relay_cdc.prepare(url, settings.cdc_slot, settings.cdc_publication)
    return applied


def seed(url: str, *, reset: bool = False) -> int:
    """Insert the five seed products; with ``reset``, also put their stock back to the seed quantities."""
    on_conflict = (
        (
            "DO UPDATE SET available_quantity = EXCLUDED.available_quantity, "
            "version = inventory.inventory_items.version + 1, updated_at = now()"
        )
        if reset
        else "DO NOTHING"
    )
    with db.connect(url) as conn, conn.transaction():
        for pid, name, price, qty in SEED_PRODUCTS:
            conn.execute(
                "INSERT INTO inventory.products (id, name, base_price) VALUES (%s, %s, %s) ON CONFLICT (id) DO NOTHING",
                (pid, name, price),
            )
            conn.execute(
                "INSERT INTO inventory.inventory_items (product_id, available_quantity) VALUES (%s, %s) "
                f"ON CONFLICT (product_id) {on_conflict}",
                (pid, qty),
            )
    return len(SEED_PRODUCTS)
