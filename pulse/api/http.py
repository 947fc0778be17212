"""uvicorn's HTTP protocol (httptools), with each response sent in one write instead of two.

uvicorn writes a response's head when the app starts it and its body when the app sends it: two ``send()``
calls. Over loopback each one also runs the receiving side's TCP stack, on the server's GIL. py-spy put those two
writes at 26 % of the API's GIL samples during cart adds (bench/NOTES.md). Writes made in one turn of the event
loop are held and sent together at the end of that turn, which is before anything else could have been written.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class _OneWritePerTurn:
    """A transport whose writes of one event-loop turn go out as one ``write`` (everything else is the transport's)."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport, self._loop = transport, loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(bytes(data))

    def _flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self._flush()  # uvicorn writes an error answer and closes at once: the answer must go first
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class OneWriteHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol over :class:`_OneWritePerTurn` (``uvicorn.Config(http=...)``)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_OneWritePerTurn(transport, self.loop))  # type: ignore[arg-type]
