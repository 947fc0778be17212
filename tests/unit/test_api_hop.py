"""The hot routes' thread hop: answers, errors, and no more threads than its limit."""

from __future__ import annotations

import asyncio
import threading

import pytest

from pulse.api.hot import Hop


def test_a_call_runs_off_the_event_loop_and_its_result_comes_back():
    hop = Hop(threads=2)

    async def main():
        loop_thread = threading.get_ident()
        result = await hop(lambda: threading.get_ident())
        return loop_thread, result

    loop_thread, worker_thread = asyncio.run(main())
    assert worker_thread != loop_thread


def test_an_exception_of_the_call_is_raised_in_the_request():
    hop = Hop(threads=2)

    def fail():
        raise LookupError("no such cart")

    async def main():
        await hop(fail)

    with pytest.raises(LookupError, match="no such cart"):
        asyncio.run(main())


def test_calls_run_concurrently_up_to_the_limit_and_no_further():
    hop = Hop(threads=3)
    running, peak, lock, release = 0, 0, threading.Lock(), threading.Event()

    def slow():
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        release.wait(5)
        with lock:
            running -= 1

    async def main():
        calls = [asyncio.ensure_future(hop(slow)) for _ in range(5)]
        for _ in range(200):
            await asyncio.sleep(0.01)
            if peak == 3:
                break
        release.set()
        await asyncio.gather(*calls)

    asyncio.run(main())
    assert peak == 3
    assert hop._threads == 3


def _blocking_call():
    """(started, release, call): ``call`` sets ``started`` and runs until ``release`` is set."""
    started, release = threading.Event(), threading.Event()

    def call():
        started.set()
        release.wait(5)
        return "late"

    return started, release, call


def test_a_request_that_went_away_does_not_break_the_worker():
    hop = Hop(threads=1)
    started, release, slow = _blocking_call()
    errors = []

    async def main():
        asyncio.get_running_loop().set_exception_handler(lambda _, context: errors.append(context))
        abandoned = asyncio.ensure_future(hop(slow))
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 5)
        abandoned.cancel()
        release.set()
        return await hop(lambda: "next")  # the one worker settled the cancelled call and took this one

    assert asyncio.run(main()) == "next"
    assert errors == []  # settling a cancelled call's future would raise InvalidStateError in the loop


def test_an_answer_for_a_loop_that_closed_does_not_kill_the_worker():
    hop = Hop(threads=1)
    started, release, slow = _blocking_call()

    async def first():
        asyncio.ensure_future(hop(slow))
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 5)

    asyncio.run(first())  # returns, and closes its loop, while the call still runs
    release.set()

    async def second():
        return await asyncio.wait_for(hop(lambda: "still serving"), 5)

    assert asyncio.run(second()) == "still serving"
