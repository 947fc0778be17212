"""The expired-cart sweeper: Redis (Lua, atomic) then the database, so reconciliation never revives a cart."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pulse.infra import db

if TYPE_CHECKING:
    from pulse.deps import Deps

TOMBSTONE_RETENTION = "1 day"


def sweep_once(deps: Deps) -> dict[str, Any]:
    """Release and delete every cart idle for longer than the cart TTL; returns the counts."""
    now_ms = int(deps.clock() * 1000)
    swept = deps.scripts.remove_expired_reserves([], [now_ms])
    with db.transaction(deps.pool) as conn:
        cleared = conn.execute(
            "UPDATE inventory.cart_items ci SET quantity = 0, updated_at = now() FROM inventory.carts c "
            "WHERE ci.cart_id = c.id AND ci.quantity > 0 AND c.updated_at < now() - make_interval(secs => %s) "
            "RETURNING c.id",
            (deps.settings.cart_ttl_s,),
        ).fetchall()
        purged = conn.execute(
            "DELETE FROM inventory.cart_items WHERE quantity = 0 "
            f"AND updated_at < now() - interval '{TOMBSTONE_RETENTION}'"
        ).rowcount
    return {
        "redisCartsSwept": int(swept),
        "dbCartsCleared": len({r["id"] for r in cleared}),
        "tombstonesPurged": purged,
    }
