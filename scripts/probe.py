#!/usr/bin/env python3
"""Does a service answer at its URL? Standard library only, so it runs before the project's .venv exists.

Usage: probe.py answers KIND URL      exit 0 when the server speaks its protocol there
       probe.py where KIND URL        print "host port local" (local: yes when the host is this machine)
       probe.py admin-url URL         the PostgreSQL URL with database "postgres" (exists before migrate)
KIND is postgres, redis or amqp.

A TCP connect alone is not enough: a port can be open while the server is still booting (RabbitMQ) or
while something else holds it, so each probe waits for the server's own first protocol reply.
"""

from __future__ import annotations

import socket
import struct
import sys
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

DEFAULT_PORTS = {"postgres": 5432, "redis": 6379, "amqp": 5672}
LOCAL_HOSTS = {"", "localhost", "127.0.0.1", "::1", "0.0.0.0"}
TIMEOUT_S = 3.0


def _conninfo_pairs(text: str) -> dict[str, str]:
    pairs = {}
    for token in text.split():
        if "=" in token:
            key, value = token.split("=", 1)
            pairs[key.strip()] = value.strip().strip("'")
    return pairs


def where(kind: str, url: str) -> tuple[str, int]:
    """Host (or a unix socket path) and port that ``url`` points at."""
    if kind == "postgres" and "://" not in url:
        pairs = _conninfo_pairs(url)
        return pairs.get("host", "/var/run/postgresql"), int(pairs.get("port", DEFAULT_PORTS[kind]))
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path, 0
    query = parse_qs(parts.query)
    host = unquote(parts.hostname or "") or query.get("host", [""])[0]
    if kind == "postgres" and not host:
        host = "/var/run/postgresql"
    default = 5671 if parts.scheme == "amqps" else DEFAULT_PORTS[kind]
    port = parts.port or int(query.get("port", [default])[0])
    return host, port


def is_local(host: str) -> bool:
    return host in LOCAL_HOSTS or host.startswith("/") or host.startswith("127.")


def _connect(kind: str, host: str, port: int) -> socket.socket:
    if host.startswith("/"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(TIMEOUT_S)
        sock.connect(f"{host}/.s.PGSQL.{port}" if kind == "postgres" else host)
        return sock
    sock = socket.create_connection((host, port), timeout=TIMEOUT_S)
    sock.settimeout(TIMEOUT_S)
    return sock


def _reply(kind: str, sock: socket.socket) -> bool:
    if kind == "postgres":
        sock.sendall(struct.pack("!ii", 8, 80877103))  # SSLRequest: every PostgreSQL answers with one byte, S or N
        return sock.recv(1) in (b"S", b"N")
    if kind == "redis":
        sock.sendall(b"PING\r\n")  # +PONG, or -NOAUTH when a password is set: either way Redis is there
        return sock.recv(64)[:1] in (b"+", b"-")
    sock.sendall(b"AMQP\x00\x00\x09\x01")  # protocol header; RabbitMQ replies with a Connection.Start method frame
    return sock.recv(7)[:1] == b"\x01"


def answers(kind: str, url: str) -> bool:
    """True when the server behind ``url`` replies in its own protocol within a few seconds."""
    host, port = where(kind, url)
    try:
        with _connect(kind, host, port) as sock:
            return _reply(kind, sock)
    except OSError:
        return False


def admin_url(url: str) -> str:
    """The same server and credentials, database ``postgres``."""
    if "://" not in url:
        pairs = {**_conninfo_pairs(url), "dbname": "postgres"}
        return " ".join(f"{k}={v}" for k, v in pairs.items())
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/postgres"))


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "admin-url":
        print(admin_url(argv[1]))
        return 0
    if len(argv) != 3 or argv[0] not in ("answers", "where") or argv[1] not in DEFAULT_PORTS:
        print(__doc__, file=sys.stderr)
        return 2
    command, kind, url = argv
    if command == "where":
        host, port = where(kind, url)
        print(host or "localhost", port, "yes" if is_local(host) else "no")
        return 0
    return 0 if answers(kind, url) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
