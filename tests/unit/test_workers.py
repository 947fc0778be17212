"""Consumer supervision (pulse/infra/workers.py) with plain threads: restart, counts, shutdown."""

import threading

from pulse.infra.workers import ConsumerSupervisor


class Worker(threading.Thread):
    """Stands in for a Consumer: runs ``body`` once, keeps what ended it like Consumer.run does."""

    def __init__(self, queue, body, handled=0):
        super().__init__(name=f"consumer:{queue}:0", daemon=True)
        self.queue, self.body, self.handled, self.dead_lettered, self.last_error = queue, body, handled, 1, None

    def run(self):
        try:
            self.body()
        except BaseException as exc:
            self.last_error = exc

    def fresh_copy(self):
        return Worker(self.queue, self.body)


def test_a_dead_thread_is_replaced_in_place_and_counted_with_its_reason():
    stop, release = threading.Event(), threading.Event()
    threads = ["relay"]
    supervisor = ConsumerSupervisor(stop, threads=threads)

    calls = []

    def dies():  # the first time only: the replacement then waits like a healthy consumer
        calls.append(1)
        if len(calls) == 1:
            raise KeyError("boom")
        release.wait()

    dead = supervisor.add(Worker("a.queue", dies, handled=3))
    alive = supervisor.add(Worker("b.queue", release.wait))
    dead.join(5)
    assert supervisor.check_once() == 1
    assert supervisor.check_once() == 0  # the replacement is alive
    fresh = supervisor.slots[0].current
    assert fresh is not dead and threads == ["relay", fresh, alive]
    a, b = supervisor.status()
    assert (a["queue"], a["restarts"], a["lastError"], a["handled"], a["deadLettered"]) == (
        "a.queue",
        1,
        "KeyError: 'boom'",
        3,
        2,
    )
    assert (b["restarts"], b["alive"]) == (0, True)
    assert supervisor.restarts() == {"a.queue": 1, "b.queue": 0}
    release.set()
    stop.set()
    alive.join(5)
    fresh.join(5)
    assert supervisor.check_once() == 0  # ended because we stop: not a failure


def test_a_custom_factory_builds_the_replacement():
    stop = threading.Event()
    built = []

    def make():
        built.append(Worker("c.queue", threading.Event().wait))
        return built[-1]

    supervisor = ConsumerSupervisor(stop)
    first = supervisor.add(Worker("c.queue", lambda: None), make=make)
    first.join(5)
    assert supervisor.check_once() == 1 and supervisor.slots[0].current is built[0]
    assert supervisor.status()[0]["lastError"] == "ended without an error"
    stop.set()
