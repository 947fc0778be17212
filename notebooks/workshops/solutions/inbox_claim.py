"""Reference solution: the inbox claim (exercise 2)."""


def claim(conn, table, event_id):
    # ON CONFLICT DO NOTHING waits for a concurrent transaction holding the same id: if it commits we
    # see the conflict (a duplicate), if it rolls back our insert goes through. RETURNING tells which.
    row = conn.execute(
        f"INSERT INTO {table} (event_id) VALUES (%s) ON CONFLICT (event_id) DO NOTHING RETURNING event_id", (event_id,)
    ).fetchone()
    return row is not None
