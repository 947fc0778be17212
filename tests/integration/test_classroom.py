"""Classroom mode on the real services: each student's own database, vhost, Redis DB and slot, reached with
their own credentials only; the lab touches only its own namespace; cleanup removes a class."""

from __future__ import annotations

import json
import uuid

import pika
import psycopg
import pytest

from pulse import config
from pulse.lab import classroom

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def klass(tmp_path_factory):
    """Two provisioned students, alice and bob, of a class with a random name; the class is removed after.
    One class for the module: rabbitmqctl boots an Erlang VM per call, a second or two each."""
    admin = config.from_env()
    name = "t" + uuid.uuid4().hex[:10]
    template = str(tmp_path_factory.mktemp("classroom") / "{class}" / "{student}.json")
    made = {m["student"]: m for m in classroom.provision(admin, name, ["alice", "Bob"], credentials=template)}
    yield admin, name, made, template
    classroom.cleanup(admin, name)


def _amqp(url):
    return pika.BlockingConnection(pika.URLParameters(url))


def test_a_student_reaches_only_their_own_database_and_vhost(klass):
    admin, name, made, _ = klass
    alice, bob = made["alice"]["env"], made["bob"]["env"]
    assert alice["PULSE_DATABASE_URL"] != bob["PULSE_DATABASE_URL"]
    assert alice["PULSE_REDIS_URL"] != bob["PULSE_REDIS_URL"]
    with psycopg.connect(bob["PULSE_DATABASE_URL"], autocommit=True) as conn:  # bob has something to steal
        conn.execute("CREATE TABLE secrets (v text)")
        conn.execute("INSERT INTO secrets VALUES ('bob''s answer')")
    alice_on_bobs = psycopg.conninfo.make_conninfo(alice["PULSE_DATABASE_URL"], dbname=classroom.namespace(name, "bob"))
    with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
        psycopg.connect(alice_on_bobs, connect_timeout=5)
    with psycopg.connect(alice["PULSE_DATABASE_URL"]) as conn:  # her own works
        assert conn.execute("SELECT current_user").fetchone()[0] == classroom.namespace(name, "alice")

    conn = _amqp(bob["PULSE_AMQP_URL"])  # a message waiting in bob's vhost
    channel = conn.channel()
    channel.queue_declare("orders.queue", durable=True)
    channel.queue_purge("orders.queue")
    channel.basic_publish("", "orders.queue", b"bob's event")
    conn.close()
    alice_on_bobs_vhost = alice["PULSE_AMQP_URL"].rsplit("/", 1)[0] + "/" + bob["PULSE_AMQP_URL"].rsplit("/", 1)[1]
    assert alice_on_bobs_vhost.endswith("/" + classroom.namespace(name, "bob"))
    with pytest.raises(pika.exceptions.ProbableAccessDeniedError):
        _amqp(alice_on_bobs_vhost)
    conn = _amqp(bob["PULSE_AMQP_URL"])
    assert conn.channel().queue_declare("orders.queue", passive=True).method.message_count == 1
    conn.close()


def test_the_students_lab_uses_their_namespace_and_purges_only_their_queues(klass, tmp_path):
    from pulse.lab import Lab, workshop

    admin, name, made, template = klass
    bob = made["bob"]["env"]
    conn = _amqp(bob["PULSE_AMQP_URL"])
    channel = conn.channel()
    channel.queue_declare("orders.queue", durable=True)
    channel.queue_purge("orders.queue")
    channel.basic_publish("", "orders.queue", b"bob's event")
    conn.close()

    lab = Lab(env={"PULSE_CLASSROOM": name, "JUPYTERHUB_USER": "alice", "PULSE_CLASSROOM_CREDENTIALS": template})
    assert lab.settings.database_url == made["alice"]["env"]["PULSE_DATABASE_URL"]
    assert lab.settings.outbox_mode == "polling" and lab.settings.cdc_slot == classroom.namespace(name, "alice")
    lab.start(serve=False)  # migrates, seeds and purges: as alice, in alice's namespace
    try:
        result = workshop.check_delta_query(lab, workshop.solution("delta_query.sql"))
        workshop.record(
            lab,
            {"exercise": "delta_query", "reference": False, **result},
            tmp_path / "r.json",
            notebook="workshop_04_delta_query",
        )
    finally:
        lab.stop()
    conn = _amqp(bob["PULSE_AMQP_URL"])
    assert conn.channel().queue_declare("orders.queue", passive=True).method.message_count == 1, (
        "alice's lab purged bob's queue"
    )
    conn.close()

    board = classroom.results(admin, name)
    assert set(board["student"]) == {"alice", "bob"}
    done = board.dropna(subset=["exercise"])
    assert list(done["student"]) == ["alice"] and list(done["exercise"]) == ["delta_query"]
    table = classroom.board_table(board)
    assert table.at["alice", "delta_query"] == "passed" and table.at["bob", "delta_query"] == ""


@pytest.mark.notebook
def test_class_board_notebook_reads_the_class(klass, tmp_path, monkeypatch):
    import papermill

    from pulse.config import PROJECT_ROOT

    admin, name, made, template = klass
    classroom.store_record(
        made["bob"]["env"]["PULSE_DATABASE_URL"],
        {"notebook": "workshop_01_reserve_lua", "results": {"exercise": "reserve_stock", "reference": False}},
    )
    monkeypatch.setenv("MPLBACKEND", "Agg")
    path = PROJECT_ROOT / "notebooks" / "classroom" / "class_board.ipynb"
    papermill.execute_notebook(
        str(path),
        str(tmp_path / path.name),
        kernel_name="python3",
        cwd=str(path.parent),
        parameters={"SMALL": True, "RECORD_PATH": str(tmp_path / "board.json"), "CLASS": name},
        progress_bar=False,
        execution_timeout=120,
    )
    results = json.loads((tmp_path / "board.json").read_text())["results"]
    assert results["students"] == 2 and results["passed"]["reserve_stock"] == 1


def test_cleanup_removes_the_class_last(klass, capsys):
    from pulse import cli

    admin, name, made, _ = klass
    before = classroom.namespaces(admin, name)
    assert len(before["databases"]) == len(before["roles"]) == len(before["vhosts"]) == len(before["users"]) == 2
    assert len(before["redis_dbs"]) == 2
    assert cli.main(["lab", "cleanup", "--class", name, "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["databases"] == before["databases"]
    assert classroom.namespaces(admin, name) == before  # a dry run removes nothing
    assert cli.main(["lab", "cleanup", "--class", name, "--yes"]) == 0
    assert all(v == [] for v in classroom.namespaces(admin, name).values())
