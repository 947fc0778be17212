"""pgoutput decoding on byte strings built by hand (protocol 1 layouts from the PostgreSQL documentation) and on
CopyData captured once from a real slot (fixtures/pgoutput_stream.json, written by capture_pgoutput_stream.py).

The stream tests drive :class:`TransactionDecoder.feed`, the method the relay's WalStream calls for every
CopyData message it receives."""

import json
import struct
import uuid
from pathlib import Path

import pytest

from pulse.infra import pgoutput as pg
from pulse.infra.cdc_slot import lsn_int, lsn_text, wal_level_problem
from pulse.infra.pgoutput_stream import TransactionDecoder, encode_keepalive, encode_xlog_data
from pulse.infra.relay_cdc import confirmed_prefix

CAPTURED = json.loads((Path(__file__).parent / "fixtures" / "pgoutput_stream.json").read_text())

OUTBOX_COLUMNS = [
    ("id", 2950),
    ("aggregate_type", 25),
    ("aggregate_id", 25),
    ("event_type", 25),
    ("payload", 3802),
    ("created_at", 1184),
    ("seq", 20),
]


def outbox_relation(relid=16401):
    return pg.encode_relation(relid, "shared", "outbox", OUTBOX_COLUMNS, key_columns=("id",))


def outbox_insert(event_id, event_type="ORDER_CREATED", payload='{"orderId": "o-1"}', relid=16401, seq="1"):
    return pg.encode_insert(relid, [str(event_id), "order", "o-1", event_type, payload, "2024-05-01 10:00:00+00", seq])


def test_begin_fields_are_big_endian():
    raw = b"B" + struct.pack(">QqI", 0x16B374D848, 768_000_000_000_000, 742)
    assert pg.parse(raw) == pg.Begin(final_lsn=0x16B374D848, commit_time_us=768_000_000_000_000, xid=742)


def test_commit_carries_the_end_lsn_and_a_unix_time():
    msg = pg.parse(pg.encode_commit(commit_lsn=100, end_lsn=148, commit_time_us=0))
    assert (msg.commit_lsn, msg.end_lsn) == (100, 148)
    assert msg.commit_unix_s == 946_684_800.0  # pgoutput counts from 2000-01-01


def test_relation_lists_columns_with_types_and_key_flags():
    msg = pg.parse(outbox_relation(relid=7))
    assert msg.qualified_name == "shared.outbox" and msg.relid == 7 and msg.replica_identity == "d"
    assert [c.name for c in msg.columns] == [name for name, _ in OUTBOX_COLUMNS]
    assert msg.columns[0] == pg.Column(flags=1, name="id", type_oid=2950, type_modifier=-1)
    assert msg.columns[4].flags == 0 and msg.columns[4].type_oid == 3802


def test_insert_values_are_text_with_nulls_and_utf8():
    msg = pg.parse(pg.encode_insert(9, ["a", None, "", "Grüße ✓"]))
    assert msg == pg.Insert(relid=9, values=("a", None, "", "Grüße ✓"))


def test_row_decoder_names_the_values_by_column():
    decoder = pg.RowDecoder()
    decoder.add(pg.parse(outbox_relation()))
    eid = uuid.uuid4()
    relation, row = decoder.row(pg.parse(outbox_insert(eid)))
    assert relation.name == "outbox" and row["id"] == str(eid) and row["payload"] == '{"orderId": "o-1"}'


def test_insert_before_its_relation_is_an_error():
    with pytest.raises(pg.DecodeError, match="before its Relation"):
        pg.RowDecoder().row(pg.parse(outbox_insert(uuid.uuid4())))


@pytest.mark.parametrize(
    "raw",
    [
        pg.encode_delete(1, ["x"]),
        pg.encode_update(1, ["x", "y"]),
        b"T" + struct.pack(">iBI", 1, 0, 1),
        b"Y" + struct.pack(">I", 25) + b"pg_catalog\0text\0",
        b"O" + struct.pack(">Q", 5) + b"origin\0",
        b"M" + struct.pack(">BQ", 0, 5) + b"prefix\0" + struct.pack(">I", 0),
    ],
)
def test_other_messages_are_passed_over_by_kind(raw):
    assert pg.parse(raw) == pg.Other(kind=chr(raw[0]))


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"B\x00\x01",
        b"C" + b"\x00" * 10,
        pg.encode_insert(1, ["abc"])[:-1],
        b"R" + struct.pack(">I", 1) + b"shared",
    ],
)
def test_truncated_messages_raise_decode_error(raw):
    with pytest.raises(pg.DecodeError):
        pg.parse(raw)


def test_insert_with_unchanged_toast_value_is_rejected():
    raw = b"I" + struct.pack(">I", 1) + b"N" + struct.pack(">h", 1) + b"u"
    with pytest.raises(pg.DecodeError, match="TOAST"):
        pg.parse(raw)


def feed_all(decoder, messages):
    return [tx for data in messages if (tx := decoder.feed(data)) is not None]


def test_captured_stream_yields_each_transaction_with_its_outbox_events():
    decoder = TransactionDecoder(CAPTURED["start_lsn"])
    txns = feed_all(decoder, [bytes.fromhex(h) for h in CAPTURED["copy_data"]])
    # The transaction that changed another table only was never sent (PostgreSQL 15+ skips empty ones); the
    # UPDATE and DELETE of outbox rows are not in the insert-only publication.
    assert [[str(e.id) for e in envs] for _, envs in txns] == CAPTURED["transactions"]
    assert [lsn for lsn, _ in txns] == CAPTURED["end_lsns"] and txns[0][0] < txns[1][0]
    first, second = txns[0][1]
    assert (first.event_type, first.payload) == ("ORDER_CREATED", {"n": 1})
    assert second.payload == {"note": "Grüße ✓", "items": [1, 2]} and uuid.UUID(second.aggregate_id)
    assert decoder.wal_end >= CAPTURED["end_lsns"][-1] and not decoder.in_transaction


def test_captured_stream_read_in_any_two_parts_gives_the_same_transactions():
    raw = [bytes.fromhex(h) for h in CAPTURED["copy_data"]]
    whole = feed_all(TransactionDecoder(), raw)
    for cut in range(1, len(raw)):
        decoder = TransactionDecoder()
        before = feed_all(decoder, raw[:cut])
        assert decoder.in_transaction == _begun(raw[:cut])
        assert before + feed_all(decoder, raw[cut:]) == whole


def _begun(messages) -> bool:
    """True if the last Begin or Commit among these CopyData messages is a Begin (after 'w' and its 24 bytes)."""
    kinds = [m[25:26] for m in messages if m[:1] == b"w" and m[25:26] in (b"B", b"C")]
    return bool(kinds) and kinds[-1] == b"B"


def test_stream_keeps_commit_order_and_skips_other_tables_and_deletes():
    a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    other = pg.encode_relation(500, "infra", "relay_heartbeat", [("slot", 25)])
    messages = [
        pg.encode_begin(200, 1, 10),
        outbox_relation(),
        outbox_insert(a, "ORDER_CREATED"),
        outbox_insert(b, "ORDER_UPDATED", payload='{"n": 2}'),
        pg.encode_commit(190, 200, 1),
        pg.encode_begin(300, 2, 11),
        other,
        pg.encode_insert(500, ["s"]),
        pg.encode_delete(16401, [str(a)]),
        pg.encode_commit(290, 300, 2),
        pg.encode_begin(400, 3, 12),
        outbox_insert(c, "STOCK_RESERVED"),
        pg.encode_commit(390, 400, 3),
    ]
    decoder = TransactionDecoder()
    txns = feed_all(decoder, [encode_xlog_data(m) for m in messages])
    assert [end for end, _ in txns] == [200, 300, 400] and decoder.wal_end == 400
    assert [[(e.id, e.event_type) for e in envs] for _, envs in txns] == [
        [(a, "ORDER_CREATED"), (b, "ORDER_UPDATED")],
        [],
        [(c, "STOCK_RESERVED")],
    ]
    assert txns[0][1][1].payload == {"n": 2} and txns[0][1][0].aggregate_id == "o-1"


def test_a_transaction_is_held_back_until_its_commit_arrives():
    decoder, eid = TransactionDecoder(), uuid.uuid4()
    assert decoder.feed(encode_xlog_data(pg.encode_begin(200, 1, 10))) is None and decoder.in_transaction
    assert decoder.feed(encode_xlog_data(outbox_relation())) is None
    assert decoder.feed(encode_xlog_data(outbox_insert(eid))) is None
    assert decoder.feed(encode_keepalive(150)) is None and decoder.in_transaction  # a keepalive mid-transaction
    end, envs = decoder.feed(encode_xlog_data(pg.encode_commit(190, 200, 1)))
    assert end == 200 and [e.id for e in envs] == [eid] and not decoder.in_transaction


def test_keepalives_move_wal_end_forward_only_and_keep_a_reply_request():
    decoder = TransactionDecoder(start_lsn=100)
    decoder.feed(encode_keepalive(90))
    assert decoder.wal_end == 100 and not decoder.reply_requested
    decoder.feed(encode_keepalive(500, reply_requested=True))
    decoder.feed(encode_keepalive(600))
    assert decoder.wal_end == 600 and decoder.reply_requested  # until WalStream.confirm answers it


def test_unknown_copy_data_is_ignored_and_a_broken_message_raises():
    decoder = TransactionDecoder(start_lsn=7)
    assert decoder.feed(b"x" + b"\0" * 8) is None and decoder.wal_end == 7
    with pytest.raises(pg.DecodeError):
        decoder.feed(encode_xlog_data(pg.encode_insert(1, ["abc"])[:-1]))


def test_peeked_messages_decode_like_streamed_ones():
    decoder, eid = TransactionDecoder(), uuid.uuid4()
    out = [
        decoder.message(m)
        for m in (pg.encode_begin(20, 1, 1), outbox_relation(), outbox_insert(eid), pg.encode_commit(10, 20, 1))
    ]
    assert out[:3] == [None, None, None] and out[3][0] == 20 and out[3][1][0].id == eid


def test_confirmed_prefix_stops_at_the_first_transaction_with_a_refused_event():
    ids = [uuid.uuid4() for _ in range(4)]
    env = lambda i: type("E", (), {"id": ids[i]})  # noqa: E731 - only .id is read
    txns = [(10, [env(0)]), (20, []), (30, [env(1), env(2)]), (40, [env(3)])]
    assert confirmed_prefix(txns, [True, True, True, True]) == (40, ids)
    assert confirmed_prefix(txns, [True, True, False, True]) == (20, ids[:1])
    assert confirmed_prefix(txns, [False, True, True, True]) == (None, [])


def test_lsn_text_round_trip():
    assert lsn_text(0x16B374D848) == "16/B374D848"
    assert lsn_int("16/B374D848") == 0x16B374D848 and lsn_int(lsn_text(0)) == 0


def test_wal_level_problem_says_how_to_fix_it_in_one_sentence():
    assert wal_level_problem("logical") is None
    msg = wal_level_problem("replica")
    assert "ALTER SYSTEM SET wal_level = logical" in msg and "PULSE_OUTBOX_MODE=polling" in msg
    assert msg.count(". ") == 0 and msg.endswith(".")
