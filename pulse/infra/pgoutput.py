"""Decoding of the binary messages of PostgreSQL's built-in ``pgoutput`` logical decoding plugin (protocol 1).

Only what the CDC relay needs is decoded into structures: Begin, Commit, Relation and Insert. Every other
message (Update, Delete, Truncate, Type, Origin, logical Message, the streaming messages of protocol 2+) is
returned as :class:`Other` so the caller can skip it; the relay's own DELETEs of published rows are among them.
Reference: "Logical Replication Message Formats" in the PostgreSQL documentation. Integers are big-endian,
strings are NUL-terminated, LSNs are unsigned 64-bit.
"""

from __future__ import annotations

import dataclasses
import struct

_I8 = struct.Struct(">b")
_U8 = struct.Struct(">B")
_I16 = struct.Struct(">h")
_I32 = struct.Struct(">i")
_U32 = struct.Struct(">I")
_BEGIN = struct.Struct(">QqI")  # final LSN, commit time, xid
_COMMIT = struct.Struct(">BQQq")  # flags, commit LSN, end LSN, commit time

# Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01 UTC).
PG_EPOCH_OFFSET_US = 946_684_800_000_000


class DecodeError(ValueError):
    """A pgoutput message is truncated or malformed."""


@dataclasses.dataclass(frozen=True)
class Begin:
    final_lsn: int
    commit_time_us: int
    xid: int


@dataclasses.dataclass(frozen=True)
class Commit:
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time_us: int

    @property
    def commit_unix_s(self) -> float:
        """The commit time as Unix seconds (pgoutput counts microseconds from 2000-01-01)."""
        return (self.commit_time_us + PG_EPOCH_OFFSET_US) / 1e6


@dataclasses.dataclass(frozen=True)
class Column:
    flags: int
    name: str
    type_oid: int
    type_modifier: int


@dataclasses.dataclass(frozen=True)
class Relation:
    relid: int
    namespace: str
    name: str
    replica_identity: str
    columns: tuple[Column, ...]

    @property
    def qualified_name(self) -> str:
        return f"{self.namespace}.{self.name}"


@dataclasses.dataclass(frozen=True)
class Insert:
    relid: int
    values: tuple[str | None, ...]  # text representation of each column; None for SQL NULL


@dataclasses.dataclass(frozen=True)
class Other:
    """A message the relay does not act on; ``kind`` is its one-letter type (``'D'`` delete, ``'U'`` update...)."""

    kind: str


Message = Begin | Commit | Relation | Insert | Other


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def unpack(self, st: struct.Struct) -> tuple[int, ...]:
        # Every format of this module is made of integers only.
        end = self.pos + st.size
        if end > len(self.data):
            raise DecodeError(f"message truncated at byte {self.pos} (need {st.size} more)")
        values = st.unpack_from(self.data, self.pos)
        self.pos = end
        return values

    def one(self, st: struct.Struct) -> int:
        return self.unpack(st)[0]

    def string(self) -> str:
        end = self.data.find(b"\0", self.pos)
        if end < 0:
            raise DecodeError(f"unterminated string at byte {self.pos}")
        text = self.data[self.pos : end].decode()
        self.pos = end + 1
        return text

    def raw(self, n: int) -> bytes:
        end = self.pos + n
        if n < 0 or end > len(self.data):
            raise DecodeError(f"value of {n} bytes truncated at byte {self.pos}")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def byte(self) -> str:
        return chr(self.one(_U8))


def parse(data: bytes | memoryview) -> Message:
    """Decode one pgoutput message (one row of ``pg_logical_slot_peek_binary_changes``)."""
    data = bytes(data)
    if not data:
        raise DecodeError("empty message")
    r = _Reader(data)
    kind = r.byte()
    if kind == "B":
        return Begin(*r.unpack(_BEGIN))
    if kind == "C":
        return Commit(*r.unpack(_COMMIT))
    if kind == "R":
        return _relation(r)
    if kind == "I":
        relid = r.one(_U32)
        marker = r.byte()
        if marker != "N":
            raise DecodeError(f"insert of relation {relid} has tuple marker {marker!r}, expected 'N'")
        return Insert(relid, _tuple(r))
    return Other(kind)


def _relation(r: _Reader) -> Relation:
    relid = r.one(_U32)
    namespace, name = r.string(), r.string()
    replica_identity = r.byte()
    columns = []
    for _ in range(r.one(_I16)):
        flags = r.one(_I8)
        col_name = r.string()
        type_oid, typmod = r.one(_U32), r.one(_I32)
        columns.append(Column(flags, col_name, type_oid, typmod))
    return Relation(relid, namespace, name, replica_identity, tuple(columns))


def _tuple(r: _Reader) -> tuple[str | None, ...]:
    # The relay's hot path (every event goes through it), so it indexes the bytes directly.
    data, pos = r.data, r.pos
    try:
        (count,) = _I16.unpack_from(data, pos)
        pos += 2
        values: list[str | None] = []
        for _ in range(count):
            kind = data[pos]
            pos += 1
            if kind == 0x74:  # 't': Int32 length, then the value's text
                (length,) = _I32.unpack_from(data, pos)
                pos += 4
                if length < 0 or pos + length > len(data):
                    raise DecodeError(f"value of {length} bytes truncated at byte {pos}")
                values.append(data[pos : pos + length].decode())
                pos += length
            elif kind == 0x6E:  # 'n'
                values.append(None)
            elif kind == 0x75:  # 'u': unchanged TOAST value, only in UPDATEs; insert images are complete
                raise DecodeError("unchanged TOAST value in an insert tuple")
            elif kind == 0x62:  # 'b'
                raise DecodeError("binary column value: the relay asks for text values (binary 'false')")
            else:
                raise DecodeError(f"unknown tuple value kind {chr(kind)!r}")
    except (IndexError, struct.error) as exc:
        raise DecodeError(f"tuple truncated at byte {pos}") from exc
    r.pos = pos
    return tuple(values)


class RowDecoder:
    """Turns Insert messages into ``{column: text}`` dicts using the Relation messages seen before them.

    pgoutput sends a Relation message before the first change of a table in each decoding session (and
    again after its schema changes); every SQL peek is a new session, so keep one decoder per peek.
    """

    def __init__(self) -> None:
        self.relations: dict[int, Relation] = {}

    def add(self, relation: Relation) -> None:
        self.relations[relation.relid] = relation

    def row(self, insert: Insert) -> tuple[Relation, dict[str, str | None]]:
        """The relation the insert belongs to and its column values by name."""
        relation = self.relations.get(insert.relid)
        if relation is None:
            raise DecodeError(f"insert into relation {insert.relid} before its Relation message")
        if len(relation.columns) != len(insert.values):
            raise DecodeError(
                f"insert into {relation.qualified_name} has {len(insert.values)} values "
                f"for {len(relation.columns)} columns"
            )
        return relation, {c.name: v for c, v in zip(relation.columns, insert.values, strict=True)}


# --- encoders: used by the unit tests to build messages byte by byte, and handy in the lab to show the format ---


def _cstr(text: str) -> bytes:
    return text.encode() + b"\0"


def encode_begin(final_lsn: int, commit_time_us: int, xid: int) -> bytes:
    return b"B" + _BEGIN.pack(final_lsn, commit_time_us, xid)


def encode_commit(commit_lsn: int, end_lsn: int, commit_time_us: int, flags: int = 0) -> bytes:
    return b"C" + _COMMIT.pack(flags, commit_lsn, end_lsn, commit_time_us)


def encode_relation(
    relid: int,
    namespace: str,
    name: str,
    columns: list[tuple[str, int]],
    replica_identity: str = "d",
    key_columns: tuple[str, ...] = (),
) -> bytes:
    out = [b"R", _U32.pack(relid), _cstr(namespace), _cstr(name), replica_identity.encode(), _I16.pack(len(columns))]
    for col_name, type_oid in columns:
        out += [_I8.pack(1 if col_name in key_columns else 0), _cstr(col_name), _U32.pack(type_oid), _I32.pack(-1)]
    return b"".join(out)


def encode_tuple(values: list[str | None]) -> bytes:
    out = [_I16.pack(len(values))]
    for v in values:
        if v is None:
            out.append(b"n")
        else:
            raw = v.encode()
            out += [b"t", _I32.pack(len(raw)), raw]
    return b"".join(out)


def encode_insert(relid: int, values: list[str | None]) -> bytes:
    return b"I" + _U32.pack(relid) + b"N" + encode_tuple(values)


def encode_delete(relid: int, key_values: list[str | None]) -> bytes:
    return b"D" + _U32.pack(relid) + b"K" + encode_tuple(key_values)


def encode_update(relid: int, new_values: list[str | None]) -> bytes:
    return b"U" + _U32.pack(relid) + b"N" + encode_tuple(new_values)
