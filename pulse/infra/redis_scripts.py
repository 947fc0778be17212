"""Lua scripts of ``lua/``: loaded once, called by SHA, reloaded when Redis forgot them (NOSCRIPT)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import redis

from pulse.config import PROJECT_ROOT

LUA_DIR = PROJECT_ROOT / "lua"


class RedisUnavailable(RuntimeError):
    """Redis did not answer at the configured URL."""


class Script:
    """One Lua file; ``script(keys, args)`` runs it by SHA and reloads it after a Redis restart."""

    def __init__(self, client: redis.Redis, name: str):
        self.client = client
        self.name = name
        self.source = (LUA_DIR / f"{name}.lua").read_text()
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()
        self._loaded = False

    def ensure_loaded(self) -> str:
        """The script's SHA, loading it first if this process has not (for callers that pipeline EVALSHA)."""
        if not self._loaded:
            self.load()
        return self.sha

    def __call__(self, keys: Sequence[str] = (), args: Sequence[str | int | float] = ()) -> Any:
        self.ensure_loaded()
        try:
            return self.client.evalsha(self.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            # Redis restarted (it keeps nothing on disk here) and its script cache went with it.
            self.load()
            return self.client.evalsha(self.sha, len(keys), *keys, *args)

    def load(self) -> None:
        self.sha = self.client.script_load(self.source)
        self._loaded = True


class Scripts:
    """The project's Lua scripts bound to one Redis client."""

    def __init__(self, client: redis.Redis):
        self.reserve_stock = Script(client, "reserve_stock")
        self.remove_expired_reserves = Script(client, "remove_expired_reserves")
        self.release_reservation = Script(client, "release_reservation")
        self.release_lock = Script(client, "release_lock")
        self.move_hold = Script(client, "move_hold")
        self.settle_hold = Script(client, "settle_hold")


def make_client(url: str) -> redis.Redis:
    """A Redis client with decoded strings; raises :class:`RedisUnavailable` if the server does not answer."""
    client = redis.Redis.from_url(
        url,
        decode_responses=True,
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
