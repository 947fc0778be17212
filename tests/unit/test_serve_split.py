"""How many API processes `pulse serve` runs, and how a child's exit becomes the server's."""

from __future__ import annotations

import pytest

from pulse.cli import parser
from pulse.cli.serve_split import _exit_status, api_process_count, status_file


@pytest.mark.parametrize(
    ("requested", "roles", "expected"),
    [
        (None, {"api", "workers"}, 1),  # the default: the API apart from the workers
        (None, {"api"}, 0),  # nothing to be apart from
        (None, {"workers"}, 0),
        (0, {"api", "workers"}, 0),  # everything in one process, as asked
        (2, {"api", "workers"}, 2),
        (2, {"api"}, 2),
    ],
)
def test_api_process_count(requested, roles, expected):
    assert api_process_count(requested, roles) == expected


def test_the_default_command_line_asks_for_no_count():
    args = parser().parse_args(["serve"])
    assert args.processes is None and args.role == "api,workers"


@pytest.mark.parametrize(("code", "expected"), [(137, 137), (3, 3), (-9, 137), (-15, 143), (0, 1)])
def test_a_childs_exit_is_reported_as_a_shell_would(code, expected):
    assert _exit_status(code) == expected  # 0 too: a child that left on its own still ends the server


def test_a_killed_servers_status_file_is_removed_by_the_next_server(tmp_path):
    import os
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    stale = tmp_path / f"pulse-workers-{dead_pid}.json"
    half_written = tmp_path / f"pulse-workers-{dead_pid}.json.new"
    live = tmp_path / f"pulse-workers-{os.getppid()}.json"  # a running server's: kept
    for f in (stale, half_written, live):
        f.write_text("{}")
    assert status_file(tmp_path) == tmp_path / f"pulse-workers-{os.getpid()}.json"
    assert not stale.exists() and not half_written.exists() and live.exists()
