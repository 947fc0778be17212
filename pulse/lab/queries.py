"""What the charts show, as pandas DataFrames read from PostgreSQL (SQLAlchemy) and Redis."""

from __future__ import annotations

import datetime as dt

import pandas as pd
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL

from pulse.infra import keys
from pulse.redisstock.handlers import HELD_BY_PRODUCT
from pulse.topology import INBOX_TABLES

# Which module writes each event type into the outbox (used to date an event's outbox write).
EMITTER = {
    "STOCK_RESERVED": "inventory",
    "STOCK_RELEASED": "inventory",
    "STOCK_FAILED": "inventory",
    "PAYMENT_PROCESSED": "payment",
    "PAYMENT_FAILED": "payment",
    "PAYMENT_REFUNDED": "payment",
    "ORDER_UPDATED": "orders",
}
STAGES = ("outbox", "broker", *INBOX_TABLES)


def engine_for(database_url: str):
    """A SQLAlchemy engine (psycopg 3 driver) for a libpq URL or ``key=value`` connection string."""
    p = conninfo_to_dict(database_url)
    url = URL.create(
        "postgresql+psycopg",
        username=p.get("user"),
        password=p.get("password"),
        host=p.get("host"),
        port=int(p["port"]) if p.get("port") else None,
        database=p.get("dbname"),
    )
    return create_engine(url, pool_size=2, max_overflow=2, pool_pre_ping=True)


class Queries:
    """Read-only queries behind the lab's charts; each returns a DataFrame (or a small dict)."""

    def __init__(self, database_url: str, redis_url: str):
        import redis

        self.engine = engine_for(database_url)
        self.redis = redis.Redis.from_url(redis_url, decode_responses=True)

    def sql(self, query: str, **params) -> pd.DataFrame:
        """Any SELECT as a DataFrame (``:name`` parameters), for your own charts."""
        with self.engine.connect() as conn:
            return pd.read_sql(text(query), conn, params=params)

    def close(self):
        self.engine.dispose()
        self.redis.close()

    # ----- outcomes ---------------------------------------------------------------------------------

    def status_counts(self) -> pd.DataFrame:
        """Orders by status, failure reason and display status (the CQRS view), with counts."""
        return self.sql(
            "SELECT o.status, coalesce(o.failure_reason, '') AS failure_reason, "
            "coalesce(v.display_status, '(view pending)') AS display_status, count(*) AS orders "
            "FROM orders.orders o LEFT JOIN orders.order_views v ON v.order_id = o.id "
            "GROUP BY 1, 2, 3 ORDER BY 4 DESC"
        )

    def outcome_totals(self) -> dict[str, int]:
        """``{'COMPLETED': n, 'FAILED_PAYMENT_FAILED': n, 'FAILED_OUT_OF_STOCK': n, 'IN_FLIGHT': n}``."""
        df = self.sql(
            "SELECT CASE WHEN status = 'COMPLETED' THEN 'COMPLETED' WHEN status = 'FAILED' "
            "THEN 'FAILED_' || failure_reason ELSE 'IN_FLIGHT' END AS outcome, count(*) AS n "
            "FROM orders.orders GROUP BY 1"
        )
        return {row.outcome: int(row.n) for row in df.itertuples()}

    def terminal_over_time(self, bucket_s: float = 1.0) -> pd.DataFrame:
        """Cumulative terminal orders per outcome, one row per ``bucket_s`` seconds (index: time)."""
        df = self.sql(
            "SELECT to_timestamp(floor(extract(epoch FROM updated_at) / :b) * :b) AS t, "
            "CASE WHEN status = 'COMPLETED' THEN 'COMPLETED' ELSE 'FAILED ' || failure_reason END AS outcome, "
            "count(*) AS n FROM orders.orders WHERE status IN ('COMPLETED', 'FAILED') GROUP BY 1, 2 ORDER BY 1",
            b=bucket_s,
        )
        return _cumulative(df)

    UNSETTLED = (
        "FROM orders.orders o LEFT JOIN orders.order_views v ON v.order_id = o.id "
        "WHERE o.status NOT IN ('COMPLETED', 'FAILED') OR v.order_id IS NULL "
        "OR (o.status = 'COMPLETED' AND v.display_status <> 'COMPLETED') "
        "OR (o.status = 'FAILED' AND v.display_status NOT IN ('FAILED_PAYMENT', 'FAILED_OUT_OF_STOCK', 'REFUNDED')) "
        "OR (o.failure_reason = 'PAYMENT_FAILED' AND o.strategy = 'OPTIMISTIC' AND o.inventory_status = 'RESERVED') "
        "OR (o.failure_reason = 'OUT_OF_STOCK' AND o.strategy = 'POST_PAYMENT' AND o.payment_status = 'SUCCESS') "
        "OR EXISTS (SELECT 1 FROM inventory.carts c JOIN inventory.cart_items ci ON ci.cart_id = c.id "
        "WHERE c.user_id = o.user_id AND ci.quantity > 0 AND ci.updated_at <= o.created_at)"
    )

    def unsettled_count(self) -> int:
        """Orders whose saga is not over: not terminal, compensation pending, the view not caught up, or
        the user's cart not cleared yet (a lost ``ORDER_CREATED`` on ``redis-stock.queue``, which the
        saga watchdog re-drives)."""
        return int(self.sql("SELECT count(*) AS n " + self.UNSETTLED).iloc[0]["n"])

    def unsettled_orders(self, limit: int = 5) -> pd.DataFrame:
        """The first ``limit`` unsettled orders (see :meth:`unsettled_count`) with their state, to see why."""
        return self.sql(
            "SELECT o.id::text AS order_id, o.status, o.payment_status, o.inventory_status, "
            "o.failure_reason, v.display_status, o.updated_at " + self.UNSETTLED + " ORDER BY o.updated_at LIMIT :n",
            n=limit,
        )

    # ----- compensations ----------------------------------------------------------------------------

    def compensations_over_time(self, bucket_s: float = 1.0) -> pd.DataFrame:
        """Cumulative restocks (reservations RELEASED) and refunds (payments REFUNDED) over time."""
        df = self.sql(
            "SELECT to_timestamp(floor(extract(epoch FROM updated_at) / :b) * :b) AS t, 'restocks' AS outcome, "
            "count(*) AS n FROM inventory.reservations WHERE status = 'RELEASED' GROUP BY 1 "
            "UNION ALL SELECT to_timestamp(floor(extract(epoch FROM coalesce(refunded_at, created_at)) / :b) * :b), "
            "'refunds', count(*) FROM payment.payments WHERE status = 'REFUNDED' GROUP BY 1 ORDER BY 1",
            b=bucket_s,
        )
        return _cumulative(df)

    def compensation_totals(self) -> dict[str, int]:
        """``{'restocks': n, 'refunds': n}`` so far."""
        df = self.sql(
            "SELECT (SELECT count(*) FROM inventory.reservations WHERE status = 'RELEASED') AS restocks, "
            "(SELECT count(*) FROM payment.payments WHERE status = 'REFUNDED') AS refunds"
        )
        return {k: int(v) for k, v in df.iloc[0].items()}

    # ----- Redis vs PostgreSQL ----------------------------------------------------------------------

    def drift(self, products: list[str] | None = None) -> pd.DataFrame:
        """Per product: stock and reserved units in PostgreSQL and in Redis, and the differences.

        The database's truth for ``reserved:`` is what reconciliation restores: units in live carts plus
        the items of orders whose hold moved from the cart and was not released yet (``infra.order_holds``).
        ``redis_stock`` is NaN when the key is missing (a cache miss, or a flushed Redis);
        a missing ``reserved:`` key counts as 0 held units, as the Lua script reads it.
        """
        where = "" if products is None else "WHERE p.id = ANY(CAST(:ids AS uuid[]))"
        df = self.sql(
            "SELECT p.id::text AS product_id, p.name, i.available_quantity AS db_stock "
            f"FROM inventory.products p JOIN inventory.inventory_items i ON i.product_id = p.id "
            f"{where} ORDER BY p.name, p.id",
            **({} if products is None else {"ids": list(products)}),
        )
        held = self.held_by_product(products)
        ids = list(df["product_id"])
        df["db_reserved"] = [held.get(p, 0) for p in ids]
        stock = self.redis.mget([keys.stock(p) for p in ids]) if ids else []
        reserved = self.redis.mget([keys.reserved(p) for p in ids]) if ids else []
        df["redis_stock"] = pd.array([int(v) if v is not None else None for v in stock], dtype="Int64")
        df["redis_reserved"] = [int(v or 0) for v in reserved]
        df["stock_drift"] = (df["redis_stock"] - df["db_stock"]).astype("Int64")
        df["reserved_drift"] = df["redis_reserved"] - df["db_reserved"]
        return df[
            [
                "product_id",
                "name",
                "db_stock",
                "db_reserved",
                "redis_stock",
                "redis_reserved",
                "stock_drift",
                "reserved_drift",
            ]
        ]

    def held_by_product(self, products: list[str] | None = None) -> dict[str, int]:
        """Units each product's ``reserved:`` key should hold: live cart items + unreleased order holds."""
        query = HELD_BY_PRODUCT.replace("%(products)s::uuid[]", "CAST(:products AS uuid[])")
        df = self.sql(query, products=None if products is None else [str(p) for p in products])
        return {str(r.product_id): int(r.held) for r in df.itertuples()}

    def drift_summary(self, products: list[str] | None = None) -> dict[str, int]:
        """How many products drift, and by how many units in total (missing stock keys counted apart)."""
        df = self.drift(products)
        stock = df["stock_drift"].fillna(0)
        return {
            "productsDrifting": int(((stock != 0) | (df["reserved_drift"] != 0)).sum()),
            "stockUnits": int(stock.abs().sum()),
            "reservedUnits": int(df["reserved_drift"].abs().sum()),
            "missingStockKeys": int(df["redis_stock"].isna().sum()),
        }

    def fault_strikes(self, since_epoch: float = 0.0) -> pd.DataFrame:
        """Faults that struck since ``since_epoch`` (``infra.fault_log``): columns at (epoch s), name, action."""
        if not self._has("infra.fault_log"):
            return pd.DataFrame(columns=["at", "name", "action"])
        return self.sql(
            "SELECT extract(epoch FROM fired_at)::float AS at, name, action FROM infra.fault_log "
            "WHERE fired_at >= to_timestamp(:s) ORDER BY fired_at",
            s=float(since_epoch),
        )

    def reconcile_marks(self) -> dict[str, int]:
        """The reconcilers' marker (``pulse:reconcile:marker``): instance → epoch second of its last pass.

        Every reconciler, the server's and the kernel's, stamps its field after a pass, so a changed
        value between two reads is a pass (see :class:`pulse.lab.sampler.Sampler`)."""
        from pulse.reconcile.service import MARKER_KEY

        try:
            return {k: int(v) for k, v in self.redis.hgetall(MARKER_KEY).items()}
        except Exception:  # an older marker format, or Redis away for a moment: no pass seen this time
            return {}

    def _has(self, table: str) -> bool:
        return bool(self.sql("SELECT to_regclass(:t) IS NOT NULL AS present", t=table).iloc[0]["present"])

    # ----- relay and events -------------------------------------------------------------------------

    def relay_lag(self) -> dict:
        """Rows waiting in ``shared.outbox`` and the age in seconds of the oldest (0 when drained)."""
        row = self.sql(
            "SELECT count(*) AS rows, coalesce(extract(epoch FROM now() - min(created_at)), 0) AS age "
            "FROM shared.outbox"
        ).iloc[0]
        return {"rows": int(row["rows"]), "oldestAgeS": round(float(row["age"]), 3)}

    TIMELINE_COLUMNS = ["eventId", "eventType", "stage", "at", "derived", "duplicates", "redriven"]

    def order_timeline(self, order_id: str, tapped: list[dict]) -> pd.DataFrame:
        """One order's events: when each was written to the outbox, crossed the broker, and was processed
        by each module's inbox. Columns: eventId, eventType, stage, at, derived, duplicates, redriven;
        ``attrs['strategy']`` is the order's saga strategy (which modules should have acted on each event).

        ``tapped`` comes from :class:`pulse.lab.tap.EventTap` (the broker times): an event the relay
        published twice appears twice at the broker. ``duplicates`` on an inbox row counts the
        redeliveries that module's inbox absorbed. ``redriven`` marks events the saga watchdog re-emitted.
        Outbox times come from ``infra.event_log`` (a trigger copies every outbox insert there) when the
        schema has it. Without it the outbox row is gone once published, so its time is derived
        (``derived=True``): a handler inserts its inbox row and its outbox rows in one transaction, both
        stamped ``now()`` (the transaction start), so the outbox time is the emitting module's latest inbox
        time for this order before the broker saw it; order creation's events take ``orders.created_at``.
        """
        logged = self._event_log(order_id)
        types = {e["eventId"]: e["eventType"] for e in tapped}
        types.update({r.id: r.event_type for r in logged.itertuples()})
        redriven = {r.id for r in logged.itertuples() if r.redriven}
        rows = [
            {
                "eventId": e["eventId"],
                "eventType": e["eventType"],
                "stage": "broker",
                "at": pd.Timestamp(e["brokerAt"], unit="s", tz="UTC"),
                "derived": False,
                "duplicates": 0,
            }
            for e in tapped
        ]
        rows += [
            {
                "eventId": r.id,
                "eventType": r.event_type,
                "stage": "outbox",
                "at": r.created_at,
                "derived": False,
                "duplicates": 0,
            }
            for r in logged.itertuples()
        ]
        ids = list(types)
        for module, table in INBOX_TABLES.items():
            if ids:
                found = self.sql(
                    f"SELECT event_id::text AS id, processed_at, {self._duplicates(table)} AS dups "
                    f"FROM {table} WHERE event_id = ANY(CAST(:ids AS uuid[]))",
                    ids=ids,
                )
                rows += [
                    {
                        "eventId": r.id,
                        "eventType": types[r.id],
                        "stage": module,
                        "at": r.processed_at,
                        "derived": False,
                        "duplicates": int(r.dups),
                    }
                    for r in found.itertuples()
                ]
        if logged.empty:
            pending = self.sql(
                "SELECT id::text AS id, event_type, created_at FROM shared.outbox WHERE aggregate_id = :o",
                o=str(order_id),
            )
            rows += [
                {
                    "eventId": r.id,
                    "eventType": r.event_type,
                    "stage": "outbox",
                    "at": r.created_at,
                    "derived": False,
                    "duplicates": 0,
                }
                for r in pending.itertuples()
            ]
        df = pd.DataFrame(rows, columns=self.TIMELINE_COLUMNS[:-1])
        if not df.empty:
            df["at"] = pd.to_datetime(df["at"], utc=True)
        if logged.empty:
            df = pd.concat([df, self._outbox_times(order_id, df)], ignore_index=True)
            df["at"] = pd.to_datetime(df["at"], utc=True)
        df["duplicates"] = df["duplicates"].fillna(0).astype(int)
        df["redriven"] = df["eventId"].isin(redriven)
        df = df.sort_values("at", kind="stable").reset_index(drop=True)
        strategy = self.sql("SELECT strategy FROM orders.orders WHERE id = CAST(:o AS uuid)", o=str(order_id))
        df.attrs["strategy"] = None if strategy.empty else strategy.iloc[0]["strategy"]
        return df

    def _duplicates(self, table: str) -> str:
        """The inbox's ``duplicates`` column, or 0 on a schema without it (checked once per table)."""
        cache = self.__dict__.setdefault("_dup_columns", {})
        if table not in cache:
            schema, name = table.split(".")
            cache[table] = bool(
                self.sql(
                    "SELECT count(*) AS n FROM information_schema.columns WHERE table_schema = :s AND table_name = :t "
                    "AND column_name = 'duplicates'",
                    s=schema,
                    t=name,
                ).iloc[0]["n"]
            )
        return "duplicates" if cache[table] else "0"

    def _event_log(self, order_id: str) -> pd.DataFrame:
        if self._has("infra.event_log"):
            return self.sql(
                "SELECT event_id::text AS id, event_type, created_at, redriven FROM infra.event_log "
                "WHERE aggregate_id = :o ORDER BY created_at",
                o=str(order_id),
            )
        return pd.DataFrame(columns=["id", "event_type", "created_at", "redriven"])

    def _outbox_times(self, order_id: str, df: pd.DataFrame) -> pd.DataFrame:
        created = self.sql("SELECT created_at FROM orders.orders WHERE id = CAST(:o AS uuid)", o=str(order_id))
        created_at = pd.to_datetime(created.iloc[0]["created_at"], utc=True) if not created.empty else None
        broker_rows = df[df["stage"] == "broker"]
        has_outbox = set(df.loc[df["stage"] == "outbox", "eventId"])
        rows, first_update = [], True
        for e in broker_rows.sort_values("at").itertuples():
            if e.eventId in has_outbox:
                continue
            at = None
            if e.eventType == "ORDER_CREATED" or (e.eventType == "ORDER_UPDATED" and first_update):
                at = created_at
                first_update = first_update and e.eventType != "ORDER_UPDATED"
            else:
                module = EMITTER.get(e.eventType)
                seen = pd.to_datetime(df.loc[(df["stage"] == module), "at"], utc=True)
                before = seen[seen <= e.at]
                at = before.max() if not before.empty else None
            if at is not None:
                rows.append(
                    {"eventId": e.eventId, "eventType": e.eventType, "stage": "outbox", "at": at, "derived": True}
                )
        return pd.DataFrame(rows, columns=["eventId", "eventType", "stage", "at", "derived"])


def _cumulative(df: pd.DataFrame) -> pd.DataFrame:
    if df.empty:
        return pd.DataFrame(index=pd.DatetimeIndex([], tz=dt.UTC, name="t"))
    wide = df.pivot_table(index="t", columns="outcome", values="n", aggfunc="sum", fill_value=0)
    wide.columns.name = None
    return wide.sort_index().cumsum()
