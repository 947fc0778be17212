"""pgoutput decoding on byte strings built by hand (protocol 1 layouts from the PostgreSQL documentation)."""

import struct
import uuid

import pytest

from pulse.infra import pgoutput as pg
from pulse.infra.relay_cdc import confirmed_prefix, decode_batch, lsn_int, lsn_text, wal_level_problem

OUTBOX_COLUMNS = [("id", 2950), ("aggregate_type", 25), ("aggregate_id", 25), ("event_type", 25), ("payload", 3802),
                  ("created_at", 1184), ("seq", 20)]


def outbox_relation(relid=16401):
    return pg.encode_relation(relid, "shared", "outbox", OUTBOX_COLUMNS, key_columns=("id",))


def outbox_insert(event_id, event_type="ORDER_CREATED", payload='{"orderId": "o-1"}', relid=16401, seq="1"):
    return pg.encode_insert(relid, [str(event_id), "order", "o-1", event_type, payload,
                                    "2024-05-01 10:00:00+00", seq])


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


@pytest.mark.parametrize("raw", [pg.encode_delete(1, ["x"]), pg.encode_update(1, ["x", "y"]),
                                 b"T" + struct.pack(">iBI", 1, 0, 1),
                                 b"Y" + struct.pack(">I", 25) + b"pg_catalog\0text\0",
                                 b"O" + struct.pack(">Q", 5) + b"origin\0",
                                 b"M" + struct.pack(">BQ", 0, 5) + b"prefix\0" + struct.pack(">I", 0)])
def test_other_messages_are_passed_over_by_kind(raw):
    assert pg.parse(raw) == pg.Other(kind=chr(raw[0]))


@pytest.mark.parametrize("raw", [b"", b"B\x00\x01", b"C" + b"\x00" * 10, pg.encode_insert(1, ["abc"])[:-1],
                                 b"R" + struct.pack(">I", 1) + b"shared"])
def test_truncated_messages_raise_decode_error(raw):
    with pytest.raises(pg.DecodeError):
        pg.parse(raw)


def test_insert_with_unchanged_toast_value_is_rejected():
    raw = b"I" + struct.pack(">I", 1) + b"N" + struct.pack(">h", 1) + b"u"
    with pytest.raises(pg.DecodeError, match="TOAST"):
        pg.parse(raw)


def test_decode_batch_keeps_commit_order_and_skips_other_tables_and_deletes():
    a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    other = pg.encode_relation(500, "infra", "relay_heartbeat", [("slot", 25)])
    stream = [
        pg.encode_begin(200, 1, 10), outbox_relation(), outbox_insert(a, "ORDER_CREATED"),
        outbox_insert(b, "ORDER_UPDATED", payload='{"n": 2}'), pg.encode_commit(190, 200, 1),
        pg.encode_begin(300, 2, 11), other, pg.encode_insert(500, ["s"]), pg.encode_delete(16401, [str(a)]),
        pg.encode_commit(290, 300, 2),
        pg.encode_begin(400, 3, 12), outbox_insert(c, "STOCK_RESERVED"), pg.encode_commit(390, 400, 3),
    ]
    txns = decode_batch(stream)
    assert [end for end, _ in txns] == [200, 300, 400]
    assert [[(e.id, e.event_type) for e in envs] for _, envs in txns] == [
        [(a, "ORDER_CREATED"), (b, "ORDER_UPDATED")], [], [(c, "STOCK_RESERVED")]]
    assert txns[0][1][1].payload == {"n": 2} and txns[0][1][0].aggregate_id == "o-1"


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
