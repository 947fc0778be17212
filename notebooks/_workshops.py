"""Cells of the workshop notebooks (exercises); :mod:`_build` writes them. Solutions live in workshops/solutions/."""

PARAMS = (
    "USE_REFERENCE_SOLUTION = False  # False: the auto-check runs YOUR code below; True: the instructor's "
    "solution (a blank answer fails the check)"
)

START = """from pulse.lab import Lab, record
from pulse.lab import workshop
lab = Lab(strategy=STRATEGY, outbox_mode=OUTBOX_MODE).start(serve=False)   # services ready, schema migrated"""

RESERVE = [
    (
        "md",
        """# Workshop 1 · The reservation Lua script
Write `reserve_stock.lua`: `KEYS[1]` = `stock:{id}`, `KEYS[2]` = `reserved:{id}`, `ARGV[1]` = quantity.
Return **-1** when the stock key is missing, **0** when `stock − reserved < qty` (change nothing), **1** after
incrementing `reserved`. Redis runs a script atomically: that is the whole point. (~20 minutes)""",
    ),
    ("params", PARAMS),
    ("code", START),
    ("md", "## Your script"),
    (
        "code",
        '''MY_SCRIPT = """
-- your Lua here
return -1
"""''',
    ),
    ("code", "source = workshop.solution('reserve_stock.lua') if USE_REFERENCE_SOLUTION else MY_SCRIPT"),
    (
        "md",
        "## Auto-check\nRuns your script on the real Redis, one call at a time: a cache miss, partial quantities, "
        "the exact boundary (`stock − reserved == qty` succeeds, `qty + 1` does not), a stock that fell below "
        "what is held, then 300 random calls compared with the contract. No race is needed to judge it: Redis "
        "runs each script call alone, so only the arithmetic can be wrong.",
    ),
    ("code", "result = workshop.check_reserve_script(lab, source)\nresult"),
    ("code", "lab.stop()"),
    (
        "code",
        'workshop.record(lab, {"exercise": "reserve_stock", "reference": USE_REFERENCE_SOLUTION, **result}, RECORD_PATH, '
        'notebook="workshop_01_reserve_lua")',
    ),
]

INBOX = [
    (
        "md",
        """# Workshop 2 · The inbox check
Write `claim(conn, table, event_id) -> bool`, called inside the handler's transaction before its effect:
True when this event is new for the module, False when its effect was already committed. It must stay
correct when two deliveries of one event race, and when the effect's transaction rolls back. (~20 minutes)""",
    ),
    ("params", PARAMS),
    ("code", START),
    ("md", "## Your function"),
    (
        "code",
        """def my_claim(conn, table, event_id):
    # your code here: one statement is enough
    raise NotImplementedError("write the inbox claim")""",
    ),
    (
        "code",
        "if USE_REFERENCE_SOLUTION:\n    namespace = {}\n    exec(workshop.solution('inbox_claim.py'), namespace)\n"
        "    claim = namespace['claim']\nelse:\n    claim = my_claim",
    ),
    (
        "md",
        "## Auto-check\nRuns against the real `orders.inbox`: first delivery, redelivery, rollback, and 8 racing deliveries.",
    ),
    ("code", "result = workshop.check_inbox(lab, claim)\nresult"),
    ("code", "lab.stop()"),
    (
        "code",
        'workshop.record(lab, {"exercise": "inbox", "reference": USE_REFERENCE_SOLUTION, **result}, RECORD_PATH, '
        'notebook="workshop_02_inbox")',
    ),
]

COMPENSATION = [
    (
        "md",
        """# Workshop 3 · The compensation handler
Optimistic saga, the card was declined: inventory receives `PAYMENT_FAILED` and must give back exactly what
this order reserved (`inventory.reservations`), **once**, mark the reservation RELEASED and announce
`STOCK_RELEASED` through the outbox — all in one transaction. (~30 minutes)""",
    ),
    ("params", PARAMS),
    ("code", START),
    ("md", "## Your handler"),
    (
        "code",
        """from pulse.events import EventType
from pulse.infra import db, inbox, outbox

def my_on_restock(deps, envelope):
    p = envelope.payload            # {"orderId": ..., "items": [...], ...}
    with db.transaction(deps.pool) as conn:
        # 1. inbox.claim(conn, "inventory.inbox", envelope.id) — return if already handled
        # 2. read this order's RESERVED reservation (FOR UPDATE)
        # 3. add its quantities back, mark it RELEASED, outbox.append(... STOCK_RELEASED ...) with a payload
        #    that carries the order's "strategy" (p["strategy"]): every module acts on an event by it
        raise NotImplementedError("write the restock")""",
    ),
    (
        "code",
        "if USE_REFERENCE_SOLUTION:\n    namespace = {}\n    exec(workshop.solution('compensation.py'), namespace)\n"
        "    on_restock = namespace['on_restock']\nelse:\n    on_restock = my_on_restock",
    ),
    (
        "md",
        "## Auto-check\nRuns the real saga in this kernel with your handler plugged into inventory and every card "
        "declined. The inventory consumer **crashes once** after your handler committed and before it acked "
        "(`consumer.before_ack`), so the broker delivers PAYMENT_FAILED again; later the check delivers it a third "
        "time. The reservation row must be RELEASED and the stock back where it started, in PostgreSQL and Redis.",
    ),
    ("code", "result = workshop.check_compensation(lab, on_restock)\nresult"),
    ("code", "lab.stop()"),
    (
        "code",
        'workshop.record(lab, {"exercise": "compensation", "reference": USE_REFERENCE_SOLUTION, **result}, RECORD_PATH, '
        'notebook="workshop_03_compensation")',
    ),
]

DELTA = [
    (
        "md",
        """# Workshop 4 · The reconciliation delta query
The reconciler repairs Redis from PostgreSQL but must not scan a million products every time. Write the query
that returns only the inventory rows changed since the last run (`%(lower)s`) and before the cooldown edge
(`%(upper)s` = now − cooldown): `product_id, available_quantity`. (~15 minutes)""",
    ),
    ("params", PARAMS),
    ("code", START),
    ("md", "## Your query"),
    (
        "code",
        '''MY_SQL = """
SELECT product_id, available_quantity
FROM inventory.inventory_items
-- WHERE ...
"""''',
    ),
    ("code", "sql = workshop.solution('delta_query.sql') if USE_REFERENCE_SOLUTION else MY_SQL"),
    (
        "md",
        "## Auto-check\nSix products on the real database, changed an hour before the window, exactly at `lower`, "
        "one microsecond after it, inside, exactly at `upper` and one microsecond after it. The reconciler's "
        "window is `(lower, upper]`: the previous run covered `lower`, rows after `upper` are still in flight.",
    ),
    ("code", "result = workshop.check_delta_query(lab, sql)\nresult"),
    ("code", "lab.stop()"),
    (
        "code",
        'workshop.record(lab, {"exercise": "delta_query", "reference": USE_REFERENCE_SOLUTION, **result}, RECORD_PATH, '
        'notebook="workshop_04_delta_query")',
    ),
]

CLASS_BOARD = [
    (
        "md",
        """# Class board
For the instructor in classroom mode (README, *Classroom mode*): every student's recorded workshop results,
read from each student's own database with your admin connection (the `PULSE_*` variables). A workshop
records only when its check passed, so an empty cell means *not passed yet*. Re-run to refresh.""",
    ),
    ("params", "CLASS = None                # the class's name (None: $PULSE_CLASSROOM)"),
    (
        "code",
        """import os
from pulse import config
from pulse.lab import record
from pulse.lab import classroom
klass = classroom.class_name(CLASS or os.environ.get("PULSE_CLASSROOM", ""))
records = classroom.results(config.from_env(), klass)
table = classroom.board_table(records)
print(f"class {klass}: {len(table)} students, {len(records.dropna(subset=['exercise']))} results recorded")""",
    ),
    (
        "md",
        "## Who passed what\n`passed`: the student's own code passed the check; `reference`: the check ran "
        "the instructor's solution (`USE_REFERENCE_SOLUTION = True`).",
    ),
    ("code", "table"),
    (
        "code",
        """if len(table):
    classroom.board_chart(table)
else:
    print("No student namespaces for this class yet: provision them (pulse lab provision) or wait for a first lab.")""",
    ),
    (
        "code",
        'record({"class": klass, "students": len(table), '
        '"passed": {e: int((table[e] == "passed").sum()) for e in classroom.EXERCISES} if len(table) else {}}, '
        'RECORD_PATH, notebook="class_board")',
    ),
]

WORKSHOPS = {
    "workshops/01_reserve_lua.ipynb": RESERVE,
    "workshops/02_inbox_check.ipynb": INBOX,
    "workshops/03_compensation_handler.ipynb": COMPENSATION,
    "workshops/04_reconcile_delta_query.ipynb": DELTA,
    # Not a workshop: the instructor's board, generated here with them (notebooks/_build.py writes it).
    "classroom/class_board.ipynb": CLASS_BOARD,
}
