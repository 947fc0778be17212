"""The last cell of every notebook: write what it measured where a test (or a person) can read it."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


def record(results: dict, path: str | os.PathLike | None = None, *, notebook: str | None = None) -> dict:
    """Record ``results`` (JSON-serialisable) for whoever ran the notebook, and show them.

    The JSON document ``{"notebook", "recordedAt", "results"}`` is written to ``path`` (or to
    ``$PULSE_LAB_RECORD_DIR/<notebook>.json`` when that variable is set) and also displayed as the
    cell's ``application/json`` output, tagged ``pulse_record``, so it survives in the executed notebook.
    Returns the document.
    """
    doc = {"notebook": notebook, "recordedAt": time.time(), "results": results}
    target = path or (
        Path(os.environ["PULSE_LAB_RECORD_DIR"]) / f"{notebook or 'notebook'}.json"
        if os.environ.get("PULSE_LAB_RECORD_DIR")
        else None
    )
    if target:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_text(json.dumps(doc, indent=2, default=str))
    try:
        from IPython.display import display

        display(
            {"application/json": json.loads(json.dumps(doc, default=str))},
            raw=True,
            metadata={"application/json": {"pulse_record": True}},
        )
    except ImportError:  # outside IPython there is nothing to display to
        pass
    return doc


def read(path: str | os.PathLike) -> dict:
    """The ``results`` of a recorded document."""
    return json.loads(Path(path).read_text())["results"]
