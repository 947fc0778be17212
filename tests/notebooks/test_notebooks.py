"""Every notebook runs headless (papermill, tiny parameters) against this session's private services,
and what it records must show the behaviour it teaches. Also: committed notebooks carry no outputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
GUIDED = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
WORKSHOPS = sorted((NOTEBOOKS / "workshops").glob("*.ipynb"))
ALL = sorted(NOTEBOOKS.rglob("*.ipynb"))


def test_committed_notebooks_have_no_outputs():
    dirty = [
        str(p.relative_to(ROOT))
        for p in ALL
        if p.parent.name != ".ipynb_checkpoints"
        for c in nbformat.read(p, as_version=4).cells
        if c.cell_type == "code" and (c.outputs or c.execution_count is not None)
    ]
    assert not dirty, f"notebooks with outputs (clear them, or rebuild with notebooks/_build.py): {sorted(set(dirty))}"


def test_notebooks_match_their_generator():
    sys.path.insert(0, str(NOTEBOOKS))
    try:
        import _build
    finally:
        sys.path.remove(str(NOTEBOOKS))
    for path, generated in _build.all_notebooks().items():
        assert path.exists(), f"{path.name} is missing; run notebooks/_build.py"
        on_disk = nbformat.read(path, as_version=4)
        assert [c.source for c in on_disk.cells] == [c.source for c in generated.cells], (
            f"{path.relative_to(ROOT)} differs from notebooks/_build.py; edit the generator and rebuild"
        )


def test_each_notebook_has_a_parameters_cell_and_records():
    for path in ALL:
        cells = nbformat.read(path, as_version=4).cells
        tagged = [c for c in cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{path.name}: exactly one cell tagged 'parameters'"
        assert "SMALL" in tagged[0].source and "RECORD_PATH" in tagged[0].source
        assert "record(" in cells[-1].source, f"{path.name}: the last cell must record the results"


@pytest.fixture
def run_notebook(serve_env, tmp_path, monkeypatch):
    """Execute a notebook with papermill in a fresh kernel that inherits this session's PULSE_* variables."""
    import papermill

    for name, value in serve_env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PULSE_WATCHDOG_INTERVAL_S", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")

    def run(path: Path, **parameters) -> dict:
        record = tmp_path / f"{path.stem}.json"
        executed = tmp_path / path.name
        papermill.execute_notebook(
            str(path),
            str(executed),
            kernel_name="python3",
            cwd=str(path.parent),
            parameters={"SMALL": True, "RECORD_PATH": str(record), **parameters},
            progress_bar=False,
            execution_timeout=240,
        )
        errors = [
            o
            for c in nbformat.read(executed, as_version=4).cells
            if c.cell_type == "code"
            for o in c.get("outputs", [])
            if o.get("output_type") == "error"
        ]
        assert not errors, errors
        return json.loads(record.read_text())["results"]

    return run


@pytest.mark.notebook
@pytest.mark.integration
@pytest.mark.parametrize("path", GUIDED, ids=[p.stem for p in GUIDED])
def test_guided_notebook(run_notebook, path):
    results = run_notebook(path)
    EXPECTATIONS[path.stem](results)
    if path.stem in DEMONSTRATIONS:
        _demonstrated(results, DEMONSTRATIONS[path.stem])


# The (pattern, naive switch) pairs each guided notebook must have demonstrated, off and on.
DEMONSTRATIONS = {
    "02_lua_vs_naive_oversell": {
        ("lua-reservation", "reserve-get-set"),
        ("cart-promise", "release-on-order-created"),
        ("cart-expiry", "cart-native-ttl"),
    },
    "03_outbox_polling_vs_cdc": {("publisher-confirms", "publish-no-confirm"), ("watchdog", "no-watchdog")},
    "04_compensation_live": {("compensation", "no-compensation"), ("state-guards", "unguarded-state")},
    "05_crash_lost_events_flush": {("reconcile-cooldown", "reconcile-full-scan")},
    "06_idempotency_duplicate_submits": {("idempotency-lock", "lock-no-owner")},
    "07_load_and_throughput": {
        ("optimistic-locking", "no-version-check"),
        ("dead-letter", "dlq-drop"),
        ("inbox", "no-inbox"),
    },
}


def _demonstrated(results, expected):
    """The notebook recorded each demonstration: the safeguard-off run broke an invariant the catalogue names
    for its switch (as reported by the checker), the safeguard-on run broke none."""
    from pulse import faults_catalogue

    demos = results["demonstrations"]
    assert {(d["pattern"], d["switch"]) for d in demos} == expected, demos
    for d in demos:
        assert d["off"]["violations"], d
        assert set(d["off"]["violations"]) & set(faults_catalogue.BY_NAME[d["switch"]].caught_by), d
        assert d["on"]["violations"] == [], d


def test_every_naive_switch_of_today_is_demonstrated_in_some_notebook():
    from pulse import faults_catalogue

    shown = {switch for pairs in DEMONSTRATIONS.values() for _, switch in pairs}
    missing = {e.name for e in faults_catalogue.entries("naive")} - shown - PENDING_SWITCHES
    assert not missing, f"naive switches no guided notebook demonstrates: {sorted(missing)}"


# Naive switches of the catalogue that no guided notebook demonstrates yet (names of switches, not patterns).
PENDING_SWITCHES: set[str] = set()


def _tour(r):
    assert set(r["services"].values()) == {"ok"} and r["orderStatus"] == "COMPLETED"
    assert {"outbox", "broker", "inventory", "payment", "orders"} <= set(r["stages"])


def _strategies(r):
    assert r["optimistic"] == {"status": "COMPLETED", "strategy": "OPTIMISTIC"}
    assert r["post-payment"] == {"status": "COMPLETED", "strategy": "POST_PAYMENT"}
    assert r["events"]["optimistic"] == ["inventory:ORDER_CREATED", "payment:STOCK_RESERVED"]
    assert r["events"]["post-payment"] == ["payment:ORDER_CREATED", "inventory:PAYMENT_PROCESSED"]
    lag = r["viewLag"]
    assert lag["status"] == "COMPLETED" != lag["view"] and lag["caughtUp"] == "COMPLETED", lag


def _oversell(r):
    assert r["luaAccepted"] == r["stock"]
    assert r["naiveAccepted"] > r["stock"], "the naive GET/SET race should oversell under concurrent shoppers"


def _outbox(r):
    assert r["crashedOrder"] == "COMPLETED" and r["restarts"] >= 1
    assert r["lostOrderStalled"] != "COMPLETED" and r["lostOrder"] == "COMPLETED"
    assert r["events"]["polling"] > 0


def _compensation(r):
    assert r["compensations"]["restocks"] >= 1 and r["compensations"]["refunds"] >= 1
    assert r["refundedOrder"] == "REFUNDED" and r["violations"] == []


def _drift(r):
    f = r["fixes"]
    assert f["crash-within-cooldown"]["reserved"] == 0 == f["crash-within-cooldown"]["carts"], r
    assert not f["crash-within-cooldown"]["full"], r  # the restarted server's own pass must not force a full one
    assert f["crash-after-cooldown"]["reserved"] >= 1 and f["crash-after-cooldown"]["carts"] >= 1, r
    assert r["lostOrder"] == "COMPLETED" and r["lostDrift"] == 3 and f["lost-events"]["stock"] == 1, r
    assert f["flush"]["full"] and f["flush"]["stock"] >= 1, r
    assert r["finalDrift"]["productsDrifting"] == 0 and r["restarts"] >= 1, r
    restarts = r["restartsMidSaga"]  # the lab's own RabbitMQ, then its own PostgreSQL, restarted mid-saga
    assert [x["service"] for x in restarts["restarts"]] == ["RabbitMQ", "PostgreSQL"], restarts
    assert restarts["orders"] >= 1 and restarts["final"] == {"COMPLETED": restarts["orders"]}, restarts
    assert restarts["outboxPeak"] >= 1 and restarts["violations"] == [], restarts


def _idempotency(r):
    assert r["sameKey"]["ordersInDb"] == 1 == r["sameKey"]["distinctOrders"] and r["retrySameOrder"]


def _load(r):
    assert all(run["completed"] >= 1 for run in r["runs"].values())


EXPECTATIONS = {
    "00_setup_and_tour": _tour,
    "01_one_checkout_both_strategies": _strategies,
    "02_lua_vs_naive_oversell": _oversell,
    "03_outbox_polling_vs_cdc": _outbox,
    "04_compensation_live": _compensation,
    "05_crash_lost_events_flush": _drift,
    "06_idempotency_duplicate_submits": _idempotency,
    "07_load_and_throughput": _load,
}


@pytest.mark.notebook
@pytest.mark.integration
@pytest.mark.parametrize("path", WORKSHOPS, ids=[p.stem for p in WORKSHOPS])
def test_workshop_reference_solution_passes(run_notebook, path):
    results = run_notebook(path, USE_REFERENCE_SOLUTION=True)
    assert results["reference"] is True


@pytest.mark.notebook
@pytest.mark.integration
def test_workshop_check_rejects_the_blank_exercise(run_notebook):
    import papermill

    with pytest.raises(papermill.PapermillExecutionError, match="concurrent reservations|must return"):
        run_notebook(NOTEBOOKS / "workshops" / "01_reserve_lua.ipynb", USE_REFERENCE_SOLUTION=False)


REGRESSION_MATRIX = [
    {"STRATEGY": "optimistic", "OUTBOX_MODE": "polling", "FAULTS": {}},
    {
        "STRATEGY": "post-payment",
        "OUTBOX_MODE": "polling",
        "FAULTS": {"consumer.before_ack": 0.05, "relay.after_publish": 0.05},
    },
]


@pytest.mark.notebook
@pytest.mark.integration
@pytest.mark.parametrize(
    "params",
    REGRESSION_MATRIX,
    ids=lambda p: f"{p['STRATEGY']}-{p['OUTBOX_MODE']}-{'faults' if p['FAULTS'] else 'clean'}",
)
def test_regression_notebook(run_notebook, params):
    results = run_notebook(NOTEBOOKS / "regression" / "checkout_regression.ipynb", **params)
    assert results["violations"] == [], [i for i in results["invariants"] if not i["ok"]]
    placed = results["placed"]
    assert placed["placed"] <= sum(results["outcomes"].values()) <= placed["placed"] + placed["no-answer"]
