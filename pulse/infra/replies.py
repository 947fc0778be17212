"""Redis replies as pulse's clients get them.

redis-py types every reply as ``bytes | str``, whatever the client. pulse's clients decode
(``decode_responses=True``, see :func:`pulse.infra.redis_scripts.make_client`), so their replies are ``str``: these
functions say so in one place instead of a cast at every read. They return what they are given, unconverted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import cast

from redis.typing import EncodableT, FieldT


def text(reply: bytes | str | None) -> str | None:
    """A string reply (``GET``), or None for a missing key."""
    return cast("str | None", reply)


def texts(reply: Iterable[object]) -> Iterable[str]:
    """The members of a list or set reply (``ZRANGE`` without scores, ``SMEMBERS``)."""
    return cast("Iterable[str]", reply)


def text_map(reply: Mapping[bytes | str, bytes | str]) -> dict[str, str]:
    """A hash reply (``HGETALL``)."""
    return cast("dict[str, str]", reply)


def fields(values: Mapping[str, int]) -> Mapping[FieldT, EncodableT]:
    """``values`` as ``HSET``'s mapping: its parameter's key type is invariant, so a ``dict[str, int]`` is refused."""
    return cast("Mapping[FieldT, EncodableT]", values)
