"""Teaching by breaking: run a scenario with a safeguard off and on, let the checker judge, ask before showing.

``demonstrate`` is the heart of every guided notebook: the same small scenario runs twice, first with a naive
switch on (the safeguard off), then with it off, and :meth:`pulse.lab.Lab.check` judges each run in its own
scope. The demonstration *asserts* what it teaches: the first run broke an invariant the fault catalogue says
should report that switch, the second broke none. A notebook whose demonstration stops demonstrating fails.

``predict`` / ``reveal`` ask the learner before the answer is on screen (a choice widget when run live, the
``PREDICTIONS`` parameter under papermill), and ``what_you_saw`` writes the summary from the recorded numbers.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from pulse import faults_catalogue

# The learner's predictions of this kernel, by key: {"question", "choices", "choice", "widget"}.
_PREDICTIONS: dict[str, dict] = {}


class DemonstrationFailed(AssertionError):
    """A demonstration did not show what it teaches (the safeguard-off run held, or the safeguard-on run broke)."""


# ----- demonstrations --------------------------------------------------------------------------------------


def caught_by(switch: str) -> list[str]:
    """The invariants the fault catalogue says report ``switch`` (e.g. ``caught_by('reserve-get-set')``)."""
    try:
        return list(faults_catalogue.BY_NAME[switch].caught_by)
    except KeyError:
        known = ", ".join(e.name for e in faults_catalogue.entries("naive"))
        raise ValueError(f"{switch!r} is not a naive switch of the fault catalogue; choose one of: {known}.") from None


def demonstrate(
    lab,
    pattern: str,
    switch: str,
    scenario: Callable[[object], dict],
    *,
    says: str | None = None,
    settle: Callable[[object], None] | None = None,
) -> dict:
    """Run ``scenario(lab)`` with the safeguard off (naive ``switch`` armed) and then on; judge both; assert.

    ``scenario`` makes its own products (so the two runs never see each other's rows) and returns a dict of
    plain numbers to record, plus ``"products": [ids]`` that scope the check. Each run is checked with
    :meth:`Lab.check` limited to the products and to what happened since the run began; the names of the
    invariants that failed are recorded as reported. ``says`` is a sentence template filled with each run's
    numbers for "What you saw" (e.g. ``"{accepted} carts accepted for {stock} units"``). ``settle(lab)``, when
    given, runs after the scenario and before the check (e.g. wait for the outbox to drain).

    Returns (and appends to ``lab.demonstrations``)::

        {"pattern", "switch", "caughtBy": [...], "says",
         "off": {"violations": [names], "details": {name: text}, ...numbers},
         "on":  {"violations": [], ...numbers}}

    Raises :class:`DemonstrationFailed` (an AssertionError) with one sentence when the safeguard-off run broke
    none of the invariants the catalogue names for ``switch``, or when the safeguard-on run broke any.
    """
    expected = caught_by(switch)
    runs = {}
    for side in ("off", "on"):
        since = lab.now()
        if side == "off":
            lab.arm(switch)  # the naive switch on: every lab-mode process drops the safeguard within half a second
        try:
            numbers = dict(scenario(lab) or {})
        finally:
            if side == "off":
                lab.disarm(switch)
        products = numbers.pop("products", None)
        (settle or _settle_default)(lab)
        report = lab.check(since=since, products=products)
        failed = [r for r in report if not r["ok"]]
        runs[side] = {
            "violations": [r["name"] for r in failed],
            "details": {r["name"]: r["detail"] for r in failed},
            **numbers,
        }
    demo = {"pattern": pattern, "switch": switch, "caughtBy": expected, "says": says, **runs}
    lab.demonstrations.append(demo)
    assert_demonstrated(demo)
    return demo


def assert_demonstrated(demo: dict) -> None:
    """Raise :class:`DemonstrationFailed` unless the safeguard-off run broke one of the catalogue's invariants
    for its switch and the safeguard-on run broke none."""
    off, on = demo["off"]["violations"], demo["on"]["violations"]
    if not set(off) & set(demo["caughtBy"]):
        raise DemonstrationFailed(
            f"With {demo['switch']} on, the {demo['pattern']} scenario should have broken "
            f"{' or '.join(demo['caughtBy'])}, but the checker reported {', '.join(off) or 'nothing'}."
        )
    if on:
        raise DemonstrationFailed(
            f"With the {demo['pattern']} safeguard on, the scenario should keep every "
            f"invariant, but the checker reported {', '.join(on)}."
        )


def _settle_default(lab) -> None:
    """Let the relay publish what the scenario wrote (the outbox check is not scoped to one run)."""
    if not lab.running or lab.held:
        return
    deadline, empty_since = time.monotonic() + 15, None
    while time.monotonic() < deadline:
        if lab.q.relay_lag()["rows"]:
            empty_since = None
        elif empty_since is None:
            empty_since = time.monotonic()
        elif time.monotonic() - empty_since > 0.5:  # a watchdog re-drive may land just after the last row went
            return
        time.sleep(0.1)


def report_table(demo: dict):
    """The two runs' verdicts side by side as a DataFrame: one row per invariant that failed in either run."""
    import pandas as pd

    names = sorted(set(demo["off"]["violations"]) | set(demo["on"]["violations"]) | set(demo["caughtBy"]))
    rows = [
        {
            "invariant": n,
            "expected to catch it": n in demo["caughtBy"],
            f"safeguard off ({demo['switch']})": "BROKEN" if n in demo["off"]["violations"] else "held",
            "safeguard on": "BROKEN" if n in demo["on"]["violations"] else "held",
            "what the checker said (off)": demo["off"]["details"].get(n, ""),
        }
        for n in names
    ]
    return pd.DataFrame(rows).set_index("invariant")


def verdict_figure(demo: dict, numbers: list[str] | None = None):
    """A figure: the invariants' verdicts (off / on) beside a bar pair per recorded number."""
    from matplotlib.figure import Figure

    numbers = numbers or [
        k
        for k, v in demo["off"].items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and isinstance(demo["on"].get(k), (int, float))
    ]
    names = sorted(set(demo["off"]["violations"]) | set(demo["caughtBy"]))
    fig = Figure(figsize=(9, 1.2 + 0.45 * max(len(names), 3)), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[1.1, 1]) if numbers else (fig.subplots(), None)
    for row, name in enumerate(names):
        for col, side in enumerate(("off", "on")):
            broken = name in demo[side]["violations"]
            left.add_patch(_box(col, row, "#d62728" if broken else "#2ca02c"))
            left.text(
                col + 0.5,
                row + 0.5,
                "broken" if broken else "held",
                ha="center",
                va="center",
                color="white",
                fontsize=9,
                fontweight="bold",
            )
    left.set_xlim(0, 2)
    left.set_ylim(len(names), 0)
    left.set_xticks([0.5, 1.5], [f"safeguard off\n({demo['switch']})", "safeguard on"], fontsize=8)
    left.set_yticks(
        [i + 0.5 for i in range(len(names))], [n + (" *" if n in demo["caughtBy"] else "") for n in names], fontsize=8
    )
    left.tick_params(length=0)
    for spine in left.spines.values():
        spine.set_visible(False)
    left.set_title(f"{demo['pattern']}: what the checker reported", fontsize=10)
    left.set_xlabel("* the fault catalogue expects this invariant to catch the switch", fontsize=7)
    if right is not None:
        x = range(len(numbers))
        right.bar(
            [i - 0.2 for i in x], [demo["off"][k] for k in numbers], width=0.4, color="#d62728", label="safeguard off"
        )
        right.bar(
            [i + 0.2 for i in x], [demo["on"][k] for k in numbers], width=0.4, color="#2ca02c", label="safeguard on"
        )
        right.set_xticks(list(x), numbers, fontsize=8, rotation=15)
        right.legend(fontsize=8)
        right.set_title("the numbers of each run", fontsize=10)
    return fig


def _box(x, y, color):
    from matplotlib.patches import Rectangle

    return Rectangle((x + 0.04, y + 0.06), 0.92, 0.88, color=color)


def show(demo: dict, numbers: list[str] | None = None):
    """Display a demonstration's verdict chart and its report table (live or headless); returns the table."""
    from pulse.lab.experiments import show as show_figure

    show_figure(verdict_figure(demo, numbers))
    return report_table(demo)


# ----- predictions ------------------------------------------------------------------------------------------


def predict(question: str, choices: list[str], key: str, answers: dict | None = None) -> str | None:
    """Ask the learner to predict before the reveal; returns the prediction known now (None if not yet chosen).

    Under papermill (or whenever ``answers`` — the notebook's ``PREDICTIONS`` parameter — has ``key``), the
    answer is read from there. Otherwise, in a kernel with ipywidgets, a choice is displayed and read later by
    :func:`reveal`, so the learner can click before running the reveal cell.
    """
    if answers is None:
        answers = _user_ns().get("PREDICTIONS") or {}
    entry = {"question": question, "choices": list(choices), "choice": answers.get(key), "widget": None}
    _PREDICTIONS[key] = entry
    if entry["choice"] is not None:
        _say(f"**Prediction** — {question} You chose: *{entry['choice']}*.")
        return entry["choice"]
    try:
        import ipywidgets as widgets
        from IPython.display import display
    except ImportError:
        _say(f"**Predict** — {question} Choices: {', '.join(choices)}.")
        return None
    entry["widget"] = widgets.RadioButtons(
        options=list(choices), value=None, description="", layout=widgets.Layout(width="auto")
    )
    display(widgets.VBox([widgets.HTML(f"<b>Predict</b> — {question}"), entry["widget"]]))
    return None


def reveal(key: str, actual: str) -> dict:
    """Compare the learner's prediction for ``key`` with what happened, in one sentence; returns the comparison."""
    entry = _PREDICTIONS.get(key, {"question": key, "choice": None, "widget": None})
    choice = entry["choice"] if entry.get("widget") is None else entry["widget"].value
    if choice is None:
        text = f"What happened: **{actual}** (no prediction was made)."
    elif choice == actual:
        text = f"You predicted **{choice}**, and that is what happened."
    else:
        text = f"You predicted **{choice}**, but what happened was **{actual}**: worth a second look at why."
    _say(text)
    result = {"key": key, "predicted": choice, "actual": actual, "correct": choice == actual if choice else None}
    entry["result"] = result
    return result


def predictions() -> list[dict]:
    """Every revealed prediction of this kernel (for the notebook's record)."""
    return [e["result"] for e in _PREDICTIONS.values() if "result" in e]


# ----- what you saw -----------------------------------------------------------------------------------------


def what_you_saw(demonstrations: list[dict], extra: list[str] | None = None, *, display: bool = True) -> str:
    """Markdown written from the recorded demonstrations (and ``extra`` lines), displayed and returned."""
    lines = []
    for demo in demonstrations:
        off, on = demo["off"], demo["on"]
        lead = f"- **{demo['pattern']}** — safeguard off (`{demo['switch']}`)"
        if demo.get("says"):
            lead += ": " + _fill(demo["says"], off)
        lines.append(f"{lead}; the checker reported **{', '.join(off['violations']) or 'nothing'}**.")
        on_text = _fill(demo["says"], on) + "; " if demo.get("says") else ""
        lines.append(
            f"  Safeguard on: {on_text}"
            + ("every invariant held." if not on["violations"] else f"it reported {', '.join(on['violations'])}.")
        )
    lines += [f"- {line}" for line in extra or []]
    for p in predictions():
        if p["predicted"] is not None:
            lines.append(
                f"- You predicted *{p['predicted']}* for “{_PREDICTIONS[p['key']]['question']}”; "
                f"it was *{p['actual']}*."
            )
    text = "\n".join(lines)
    if display:
        _say(text)
    return text


def _fill(template: str, numbers: dict) -> str:
    try:
        return template.format(**numbers)
    except (KeyError, IndexError, ValueError):
        return template


def _say(markdown: str) -> None:
    try:
        from IPython.display import Markdown, display
    except ImportError:
        print(markdown)
        return
    display(Markdown(markdown))


def _user_ns() -> dict:
    try:
        from IPython import get_ipython
    except ImportError:
        return {}
    shell = get_ipython()
    return shell.user_ns if shell is not None else {}


# ----- the real code, not a paraphrase ------------------------------------------------------------------------


def lua(name: str) -> str:
    """Show and return the Lua script ``lua/<name>.lua`` exactly as Redis runs it."""
    from pulse.infra.redis_scripts import LUA_DIR

    text = (LUA_DIR / f"{name}.lua").read_text()
    _say(f"`lua/{name}.lua`\n```lua\n{text.rstrip()}\n```")
    return text


def source(obj, *, language: str = "python") -> str:
    """Show and return the source of a function, class or SQL string the system runs (``inspect.getsource``)."""
    import inspect

    text = obj if isinstance(obj, str) else inspect.getsource(obj)
    where = "" if isinstance(obj, str) else f"`{obj.__module__}.{obj.__qualname__}`\n"
    _say(f"{where}```{language}\n{text.rstrip()}\n```")
    return text
