"""The live dashboard's invariants panel, driven through its own widgets: the load slider, the naive-switch
checkboxes and the Apply button. With the switch off the panel stays green under load; ticking
``no-compensation`` turns stock-conservation red within seconds."""

from __future__ import annotations

import time

import pytest

from pulse.lab.lab import Lab

pytestmark = [pytest.mark.integration, pytest.mark.slow]

pytest.importorskip("ipywidgets")

WATCHED = "stock-conservation"  # what no-compensation breaks first: a declined order's units never come back
RED_WITHIN_S = 30.0
GREEN_FOR_S = 12.0


@pytest.fixture
def lab(campaign_env, tmp_path):
    # Services of its own: the switch-on half leaves broken orders on purpose.
    lab = Lab(strategy="optimistic", outbox_mode="polling", log_dir=tmp_path, env=campaign_env).start(tap=False)
    yield lab
    lab.stop()


def _badge(dash, name):
    return next(r for r in dash.last_invariants if r["name"] == name)


def test_ticking_a_naive_switch_turns_its_invariant_red_while_load_runs(lab):
    dash = lab.dashboard(interval_s=1.0, invariants_every_s=1.0)
    widgets = dash._widgets = dash._build()  # what show() displays, without a frontend
    dash.start()
    try:
        # Safeguards on: declines under load, compensated, so every badge stays green.
        widgets["decline"].value = 0.5
        widgets["apply"].click()
        assert lab.settings.payment_decline_rate == 0.5 and not lab.settings.naive
        widgets["rate"].value = 4
        deadline, checks = time.monotonic() + GREEN_FOR_S, 0
        while time.monotonic() < deadline:
            checked = dash._checked_at
            time.sleep(0.5)
            if dash._checked_at != checked:
                checks += 1
                broken = [r["name"] for r in dash.last_invariants if not r["passed"]]
                assert not broken, (broken, dash.last_invariants)
        failed = lab.execute("SELECT count(*) AS n FROM orders.orders WHERE failure_reason = 'PAYMENT_FAILED'")[0]["n"]
        assert checks >= 3 and failed >= 1, (checks, failed, dict(dash.load.counts))
        assert "✗" not in widgets["invariants"].value

        # Tick the switch and Apply: the same handler the button runs restarts the server under it.
        widgets["naive"]["no-compensation"].value = True
        ticked = time.monotonic()
        widgets["apply"].click()
        assert lab.settings.naive == {"no-compensation"}
        while time.monotonic() - ticked < RED_WITHIN_S and _badge(dash, WATCHED)["passed"]:
            time.sleep(0.25)
        red_after = time.monotonic() - ticked
        assert not _badge(dash, WATCHED)["passed"], (dash.last_invariants, dash.errors, dict(dash.load.counts))
        assert f"{WATCHED} ✗" in widgets["invariants"].value
        print(f"{WATCHED} turned red {red_after:.1f} s after Apply")
    finally:
        dash.stop()
