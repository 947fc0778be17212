"""pulse.api.http: a response leaves in one write, and nothing written is lost or reordered on close."""

import asyncio

from pulse.api.http import _OneWritePerTurn


class Transport:
    def __init__(self):
        self.writes, self.closed = [], False

    def write(self, data):
        assert not self.closed, "written after close"
        self.writes.append(data)

    def is_closing(self):
        return self.closed

    def close(self):
        self.closed = True

    def get_extra_info(self, name):
        return ("127.0.0.1", 8080) if name == "sockname" else None


def test_the_writes_of_one_turn_go_out_as_one_in_order():
    async def scenario():
        real = Transport()
        t = _OneWritePerTurn(real, asyncio.get_running_loop())
        t.write(b"HTTP/1.1 200 OK\r\n\r\n")
        t.write(b'{"a":1}')
        assert real.writes == []  # held until the turn ends
        await asyncio.sleep(0)
        t.write(b"next")
        await asyncio.sleep(0)
        return real.writes

    assert asyncio.run(scenario()) == [b'HTTP/1.1 200 OK\r\n\r\n{"a":1}', b"next"]


def test_close_sends_what_is_held_first_and_anything_else_is_the_transports():
    async def scenario():
        real = Transport()
        t = _OneWritePerTurn(real, asyncio.get_running_loop())
        t.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        t.close()
        await asyncio.sleep(0)  # the scheduled flush finds nothing left and writes nothing after the close
        return real, t.get_extra_info("sockname")

    real, name = asyncio.run(scenario())
    assert real.writes == [b"HTTP/1.1 400 Bad Request\r\n\r\n"] and real.closed
    assert name == ("127.0.0.1", 8080)
