"""The hot Redis calls' runner (redis_scripts.OneTrip) against the real server: replies, errors, lost connections."""

from __future__ import annotations

import threading
import uuid

import pytest
import redis

from pulse.infra import redis_scripts


@pytest.fixture
def scripts(settings):
    client = redis_scripts.make_client(settings.redis_url)
    scripts = redis_scripts.Scripts(client)
    yield scripts
    scripts.close()
    client.close()


def test_replies_come_back_as_the_client_would_return_them(scripts, rds):
    key, lock = f"trip:{uuid.uuid4()}", f"lock:{uuid.uuid4()}"
    rds.hset(key, mapping={"a": "1", "b": "2"})
    assert scripts.trip(("HGETALL", key), ("HINCRBY", key, "a", 4)) == [{"a": "1", "b": "2"}, 5]
    assert scripts.trip(("SET", lock, "t", "NX", "EX", 5)) == ["OK"]
    assert scripts.trip(("SET", lock, "t", "NX", "EX", 5)) == [None]
    assert scripts.trip(("HGETALL", f"trip:{uuid.uuid4()}")) == [{}]
    rds.delete(key, lock)


def test_an_error_reply_is_raised_and_the_next_call_gets_its_own_reply(scripts, rds):
    key = f"trip:{uuid.uuid4()}"
    with pytest.raises(redis.exceptions.NoScriptError):
        scripts.trip(("EVALSHA", "0" * 40, 0), ("INCR", key))
    assert rds.get(key) == "1"  # the second command ran
    assert scripts.trip(("INCR", key)) == [2]  # not the reply the error left on the connection
    rds.delete(key)


def test_a_connection_the_server_closed_is_replaced_and_nothing_is_sent_twice(scripts, rds):
    key = f"trip:{uuid.uuid4()}"
    (conn_id,) = scripts.trip(("CLIENT", "ID"))
    assert rds.client_kill_filter(_id=conn_id) == 1
    assert scripts.trip(("INCR", key)) == [1]
    assert scripts.trip(("CLIENT", "ID")) != [conn_id]
    assert rds.get(key) == "1"
    rds.delete(key)


def test_a_script_redis_forgot_is_loaded_again(scripts, rds):
    lock = f"lock:{uuid.uuid4()}"
    rds.set(lock, "token")
    assert scripts.release_lock([lock], ["token"]) == 1
    rds.script_flush()  # what a Redis restart does to the script cache
    rds.set(lock, "token")
    assert scripts.release_lock([lock], ["token"]) == 1
    assert rds.exists(lock) == 0


def test_a_script_and_the_reads_after_it_go_in_one_trip_also_after_a_reload(scripts, rds):
    lock = f"lock:{uuid.uuid4()}"
    assert scripts.release_lock([lock], ["token"]) == 0  # loaded, and nothing to release yet
    rds.set(lock, "token")
    rds.script_flush()
    assert scripts.release_lock.run([lock], ["token"], ("EXISTS", lock), ("GET", lock)) == [1, 0, None]


def test_each_thread_keeps_its_own_connection_and_close_closes_them_all(scripts):
    ids: list[int] = []

    def ask() -> None:
        for _ in range(2):
            ids.extend(scripts.trip(("CLIENT", "ID")))

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ids) == 6 and len(set(ids)) == 3  # one connection per thread, kept between its calls
    (mine,) = scripts.trip(("CLIENT", "ID"))
    scripts.close()
    assert scripts.trip(("CLIENT", "ID")) != [mine]


def test_a_forked_child_opens_its_own_connection(scripts):
    import os

    (parent,) = scripts.trip(("CLIENT", "ID"))
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its connection's id, then leave without running the parent's cleanup
        try:
            os.write(write, str(scripts.trip(("CLIENT", "ID"))[0]).encode())
        finally:
            os._exit(0)
    os.close(write)
    child = int(os.read(read, 64) or b"0")
    os.waitpid(pid, 0)
    assert child not in (0, parent)
    assert scripts.trip(("CLIENT", "ID")) == [parent]  # the parent's connection is untouched and still in step
