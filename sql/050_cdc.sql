-- CDC outbox relay (PULSE_OUTBOX_MODE=cdc): publication and relay heartbeat.
-- The replication slot is not created here: an unread slot keeps WAL forever, so only the relay (on start) and
-- `pulse db migrate` in cdc mode create it, with the configured name (PULSE_CDC_SLOT).

-- The default publication. A configured PULSE_CDC_PUBLICATION is created the same way from Python
-- (pulse.infra.relay_cdc.ensure_publication). Insert-only: the relay's own DELETEs of published rows and
-- any UPDATE never reach it.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'pulse_outbox_pub') THEN
        CREATE PUBLICATION pulse_outbox_pub FOR TABLE shared.outbox WITH (publish = 'insert');
    END IF;
END $$;

-- An earlier draft woke the relay with a NOTIFY trigger; the relay now streams the slot, and NOTIFY would
-- serialise every outbox commit on the cluster-wide notification queue lock for nothing.
DROP TRIGGER IF EXISTS outbox_notify ON shared.outbox;
DROP FUNCTION IF EXISTS shared.outbox_notify();

-- What `pulse relay status` shows about the running relay; the active relay updates its row at most once a second.
CREATE TABLE IF NOT EXISTS infra.relay_heartbeat (
    slot             text PRIMARY KEY,
    mode             text NOT NULL,
    pid              integer NOT NULL,
    host             text NOT NULL,
    started_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL,
    published        bigint NOT NULL,
    events_per_s     double precision NOT NULL,
    last_publish_at  timestamptz
);

-- Each time the cdc relay found its slot lost (the server removed WAL the slot still needed, past
-- max_slot_wal_keep_size) and created it again. Nothing is lost then: outbox rows are deleted only after the
-- broker confirmed them, and the relay publishes the rows still there. `pulse relay status` and `pulse check`
-- report the last one.
CREATE TABLE IF NOT EXISTS infra.relay_slot_losses (
    id            bigserial PRIMARY KEY,
    slot          text NOT NULL,
    recreated_at  timestamptz NOT NULL DEFAULT now(),
    reason        text NOT NULL,
    outbox_rows   bigint NOT NULL,
    pid           integer NOT NULL,
    host          text NOT NULL
);
