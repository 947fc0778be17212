-- Reference solution: the reconciliation delta (exercise 4). The window is half-open: rows at `lower`
-- were covered by the previous run, rows after `upper` (= now - cooldown) are still in flight.
SELECT product_id, available_quantity
FROM inventory.inventory_items
WHERE updated_at > %(lower)s AND updated_at <= %(upper)s
