"""Lua scripts of ``lua/``: loaded once, called by SHA, reloaded when Redis forgot them (NOSCRIPT)."""

from __future__ import annotations

import hashlib
import os
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import hiredis
import redis

from pulse.config import PROJECT_ROOT

LUA_DIR = PROJECT_ROOT / "lua"


class RedisUnavailable(RuntimeError):
    """Redis did not answer at the configured URL."""


class OneTrip:
    """Sends a few commands to Redis in one round trip, on a connection the calling thread keeps.

    For the checkout's hot calls (six per checkout): redis-py 8 spends about 60 µs of Python per call around the
    socket (pool checkout and release, the retry wrapper, its metrics recorders), four times what packing, sending
    and parsing cost (bench/NOTES.md, tenth session). Replies come back as the client's own commands would
    return them (RESP3, decoded) and an error reply is raised; a connection the server closed is replaced before
    sending, as the pool does. A command is never sent twice: redis-py's retry would resend a reservation whose
    reply was lost.
    """

    def __init__(self, client: redis.Redis) -> None:
        pool = client.connection_pool
        self._connection_class, self._kwargs = pool.connection_class, dict(pool.connection_kwargs)
        self._local = threading.local()
        self._opened: weakref.WeakSet[Any] = weakref.WeakSet()

    def __call__(self, *commands: tuple[Any, ...]) -> list[Any]:
        conn = self._connection()
        try:
            conn.send_packed_command([b"".join(map(hiredis.pack_command, commands))])  # C, not redis-py's packer
            return [conn.read_response() for _ in commands]
        except BaseException:
            conn.disconnect()  # replies may still be on their way (after an error reply, say): out of step
            raise

    def _connection(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != os.getpid():  # a forked child must not share its parent's socket
            conn = self._local.conn = self._connection_class(**self._kwargs)
            self._local.pid = os.getpid()
            self._opened.add(conn)
        try:
            # The pool's check: a server that restarted (or timed the client out) left EOF on the socket.
            if conn.can_read():
                raise redis.exceptions.ConnectionError("unexpected data on an idle connection")
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
            conn.disconnect()
        return conn

    def close(self) -> None:
        """Close every thread's connection (a thread that calls again opens a new one)."""
        for conn in list(self._opened):
            conn.disconnect()


class Script:
    """One Lua file; ``script(keys, args)`` runs it by SHA and reloads it after a Redis restart."""

    def __init__(self, client: redis.Redis, name: str, trip: OneTrip):
        self.client = client
        self.trip = trip
        self.name = name
        self.source = (LUA_DIR / f"{name}.lua").read_text()
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()
        self._loaded = False

    def __call__(self, keys: Sequence[str] = (), args: Sequence[str | int | float] = ()) -> Any:
        return self.run(keys, args)[0]

    def run(self, keys: Sequence[str], args: Sequence[str | int | float], *then: tuple[Any, ...]) -> list[Any]:
        """The script's reply, then the replies of the commands ``then``, all in one round trip.

        ``then`` must be reads: after a reload they are sent again."""
        if not self._loaded:
            self.load()
        try:
            return self.trip(("EVALSHA", self.sha, len(keys), *keys, *args), *then)
        except redis.exceptions.NoScriptError:
            # Redis restarted (it keeps nothing on disk here) and its script cache went with it.
            self.load()
            return self.trip(("EVALSHA", self.sha, len(keys), *keys, *args), *then)

    def load(self) -> None:
        self.sha = self.client.script_load(self.source)
        self._loaded = True


class Scripts:
    """The project's Lua scripts bound to one Redis client, and the one-trip runner the hot calls share."""

    def __init__(self, client: redis.Redis):
        self.trip = OneTrip(client)
        self.reserve_stock = Script(client, "reserve_stock", self.trip)
        self.remove_expired_reserves = Script(client, "remove_expired_reserves", self.trip)
        self.release_reservation = Script(client, "release_reservation", self.trip)
        self.release_lock = Script(client, "release_lock", self.trip)
        self.move_hold = Script(client, "move_hold", self.trip)
        self.settle_hold = Script(client, "settle_hold", self.trip)

    def close(self) -> None:
        self.trip.close()


def make_client(url: str) -> redis.Redis:
    """A Redis client with decoded strings; raises :class:`RedisUnavailable` if the server does not answer."""
    client = redis.Redis.from_url(
        url,
        decode_responses=True,
        protocol=3,  # OneTrip's replies are RESP3's (a hash is a dict); redis-py 8's default, pinned for older ones
        socket_connect_timeout=3,
        socket_timeout=10,
        health_check_interval=30,
        max_connections=64,
    )
    try:
        client.ping()
    except redis.exceptions.ConnectionError as exc:
        raise RedisUnavailable(f"Redis is not reachable at {url}: {exc}.") from exc
    return client
