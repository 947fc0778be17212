"""The workshops cannot be passed by accident: a blank answer fails each one with one plain sentence, the
reference solution passes, and each check catches the specific mistake it claims to catch (the instructor
guide lists them; every sentence quoted there is asserted here)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest

from pulse.lab import workshop

ROOT = Path(__file__).resolve().parents[2]
WORKSHOPS = ROOT / "notebooks" / "workshops"

# What a learner who changed nothing sees, per workshop: the one sentence of the failing check.
BLANK = {
    "01_reserve_lua": r"A reservation of 3 with 10 in stock and nothing reserved must return 1, got -1\.",
    "02_inbox_check": r"Your claim is not written yet: replace the NotImplementedError in the cell above\.",
    "03_compensation_handler": r"Your on_restock is not written yet: replace the NotImplementedError in the cell above\.",
    "04_reconcile_delta_query": r"A product changed an hour before the window is in your delta; it must not be\.",
}


class _Lab:
    """The two things a check uses of a Lab, on this session's private services."""

    running = False

    def __init__(self, settings):
        self.settings = settings

    def redis(self):
        import redis

        return redis.Redis.from_url(self.settings.redis_url, decode_responses=True)


@pytest.fixture
def lab(settings):
    return _Lab(settings)


def test_default_is_the_learners_code():
    for path in sorted(WORKSHOPS.glob("*.ipynb")):
        cell = next(c for c in nbformat.read(path, as_version=4).cells if "parameters" in c.metadata.get("tags", []))
        assert re.search(r"^USE_REFERENCE_SOLUTION = False\b", cell.source, re.M), path.name


# ----- WS1: the script's semantics, one call at a time -----------------------------------------------------

LUA_OFF_BY_ONE = workshop.solution("reserve_stock.lua").replace("< qty", "<= qty")
LUA_ONE_UNIT = workshop.solution("reserve_stock.lua").replace(
    "redis.call('INCRBY', KEYS[2], qty)", "redis.call('INCR', KEYS[2])"
)
LUA_MISS_AS_ZERO = workshop.solution("reserve_stock.lua").replace("return -1", "return 0")
LUA_STOCK_ONLY = workshop.solution("reserve_stock.lua").replace(
    "tonumber(stock) - reserved < qty", "tonumber(stock) < qty"
)
LUA_INCR_FIRST = """local qty = tonumber(ARGV[1])
local stock = redis.call('GET', KEYS[1])
if not stock then return -1 end
local reserved = redis.call('INCRBY', KEYS[2], qty)
if reserved > tonumber(stock) then redis.call('DECRBY', KEYS[2], qty) return 0 end
return 1"""
LUA_MISS_CREATES = workshop.solution("reserve_stock.lua").replace(
    "if not stock then", "redis.call('INCRBY', KEYS[2], 0)\nif not stock then"
)


@pytest.mark.integration
def test_ws1_reference_passes(lab):
    result = workshop.check_reserve_script(lab, workshop.solution("reserve_stock.lua"))
    assert result["randomCalls"] == 300 and result["boundary"] == "exact"


@pytest.mark.integration
def test_ws1_production_script_passes_with_two_keys(lab):
    """lua/reserve_stock.lua has optional extra KEYS; the workshop's contract (stock, reserved; qty) is its core."""
    workshop.check_reserve_script(lab, (ROOT / "lua" / "reserve_stock.lua").read_text())


@pytest.mark.integration
@pytest.mark.parametrize(
    "source, sentence",
    [
        (LUA_OFF_BY_ONE, r"with 10 in stock and 7 reserved \(exactly what is left\) must return 1, got 0"),
        (LUA_ONE_UNIT, r"reserved: went from 0 to 1; it must grow by exactly 3"),
        (LUA_MISS_AS_ZERO, r"stock: is missing \(a cache miss\) must return -1, got 0"),
        (LUA_STOCK_ONLY, r"with 10 in stock and 7 reserved \(one more than is left\) must return 0, got 1"),
        (LUA_MISS_CREATES, r"A cache miss must not create reserved:"),
        ("return 1", r"stock: is missing \(a cache miss\) must return -1, got 1"),
        ("return 'yes'", r"must return -1, 0 or 1"),
        ("this is not lua", r"Redis could not load your script"),
    ],
    ids=[
        "off-by-one",
        "one-unit",
        "miss-as-zero",
        "ignores-reserved",
        "miss-creates-key",
        "always-yes",
        "nil",
        "syntax",
    ],
)
def test_ws1_catches_each_mistake(lab, source, sentence):
    with pytest.raises(AssertionError, match=sentence):
        workshop.check_reserve_script(lab, source)


@pytest.mark.integration
def test_ws1_incr_then_undo_is_correct_and_passes(lab):
    """Incrementing first and undoing is atomic in Lua, so it is right: the check must not fail it for style."""
    workshop.check_reserve_script(lab, LUA_INCR_FIRST)


# ----- WS4: the window's bounds ----------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize(
    "where, sentence",
    [
        ("updated_at > %(lower)s AND updated_at <= %(upper)s", None),
        (
            "updated_at >= %(lower)s AND updated_at <= %(upper)s",
            r"changed exactly at the lower bound .* is in your delta",
        ),
        ("updated_at > %(lower)s AND updated_at < %(upper)s", r"changed exactly at the upper bound is missing"),
        ("updated_at > %(lower)s", r"one microsecond after the upper bound \(still in flight\) is in your delta"),
        (
            "updated_at > %(lower)s + interval '1 millisecond' AND updated_at <= %(upper)s",
            r"one microsecond after the lower bound is missing",
        ),
        ("updated_at > %(lower)s AND updated_at <= %(upper)s + interval '1 microsecond'", r"after the upper bound"),
    ],
    ids=["reference", "lower-inclusive", "upper-exclusive", "no-upper", "coarse-lower", "upper-late"],
)
def test_ws4_window_bounds(lab, where, sentence):
    sql = f"SELECT product_id, available_quantity FROM inventory.inventory_items WHERE {where}"
    if sentence is None:
        assert workshop.check_delta_query(lab, sql)["boundsChecked"] == 6
    else:
        with pytest.raises(AssertionError, match=sentence):
            workshop.check_delta_query(lab, sql)


@pytest.mark.integration
def test_ws4_needs_the_quantity(lab):
    with pytest.raises(AssertionError, match="Select product_id and available_quantity"):
        workshop.check_delta_query(
            lab,
            "SELECT product_id FROM inventory.inventory_items WHERE updated_at > %(lower)s AND updated_at <= %(upper)s",
        )


# ----- WS3: compensation under a crash between saga steps --------------------------------------------------


def _reference_restock():
    namespace = {}
    exec(workshop.solution("compensation.py"), namespace)
    return namespace["on_restock"]


def _restock_without_inbox_or_status():
    """Restocks from the reservation row whatever its status, with no inbox claim: each delivery restocks."""
    from pulse.events import EventType
    from pulse.infra import db, outbox

    def on_restock(deps, envelope):
        p = envelope.payload
        with db.transaction(deps.pool) as conn:
            row = conn.execute(
                "SELECT items FROM inventory.reservations WHERE order_id = %s", (p["orderId"],)
            ).fetchone()
            for item in row["items"]:
                conn.execute(
                    "UPDATE inventory.inventory_items SET available_quantity = available_quantity + %s "
                    "WHERE product_id = %s",
                    (item["quantity"], item["productId"]),
                )
            conn.execute("UPDATE inventory.reservations SET status = 'RELEASED' WHERE order_id = %s", (p["orderId"],))
            outbox.append(
                conn,
                EventType.STOCK_RELEASED,
                "ORDER",
                p["orderId"],
                {"orderId": p["orderId"], "items": row["items"], "strategy": p.get("strategy")},
            )

    return on_restock


def _restock_without_release_row():
    """Claims the inbox and restocks, announces it, but leaves the reservation RESERVED."""
    reference = _reference_restock()
    from pulse.infra import db

    def on_restock(deps, envelope):
        reference(deps, envelope)
        with db.transaction(deps.pool) as conn:
            conn.execute(
                "UPDATE inventory.reservations SET status = 'RESERVED' WHERE order_id = %s",
                (envelope.payload["orderId"],),
            )

    return on_restock


@pytest.mark.integration
def test_ws3_reference_survives_the_crash(lab):
    result = workshop.check_compensation(lab, _reference_restock())
    assert result["reservation"] == "RELEASED" and result["stock"] == 10
    assert result["crashes"] == 1 and result["deliveries"] >= 3


@pytest.mark.integration
@pytest.mark.parametrize(
    "make, sentence",
    [
        (
            _restock_without_inbox_or_status,
            r"Stock is 16 after the restock, a redelivery after a crash and a late redelivery; it must be back at 10",
        ),
        (_restock_without_release_row, r"reservation row is RESERVED, not RELEASED"),
    ],
    ids=["no-inbox-no-status", "row-left-reserved"],
)
def test_ws3_catches_each_mistake(lab, make, sentence):
    with pytest.raises(AssertionError, match=sentence):
        workshop.check_compensation(lab, make())


# ----- every notebook, headless: blank fails with its sentence, the reference passes ------------------------


@pytest.fixture
def papermill_env(serve_env, monkeypatch):
    for name, value in serve_env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MPLBACKEND", "Agg")


def _execute(path: Path, out: Path, **parameters):
    import papermill

    papermill.execute_notebook(
        str(path),
        str(out / path.name),
        kernel_name="python3",
        cwd=str(path.parent),
        parameters={"SMALL": True, "RECORD_PATH": str(out / f"{path.stem}.json"), **parameters},
        progress_bar=False,
        execution_timeout=120,
    )


@pytest.mark.notebook
@pytest.mark.integration
@pytest.mark.parametrize("stem", sorted(BLANK))
def test_blank_answer_fails_with_one_sentence(papermill_env, tmp_path, stem):
    import papermill

    path = WORKSHOPS / f"{stem}.ipynb"
    with pytest.raises(papermill.PapermillExecutionError) as failed:
        _execute(path, tmp_path)  # the default parameters: the learner's (blank) code
    assert failed.value.ename == "AssertionError", failed.value.ename
    assert re.fullmatch(BLANK[stem], failed.value.evalue), failed.value.evalue
    assert not (tmp_path / f"{stem}.json").exists(), "a failed check must not record a result"


@pytest.mark.notebook
@pytest.mark.integration
@pytest.mark.parametrize("stem", sorted(BLANK))
def test_reference_solution_passes(papermill_env, tmp_path, stem):
    _execute(WORKSHOPS / f"{stem}.ipynb", tmp_path, USE_REFERENCE_SOLUTION=True)
    results = json.loads((tmp_path / f"{stem}.json").read_text())["results"]
    assert results["reference"] is True
