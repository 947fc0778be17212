-- Run-time fault injection (issue 4). Armed faults live here so every process sees them without a restart.
CREATE TABLE IF NOT EXISTS infra.faults (
    name         text PRIMARY KEY,
    action       text NOT NULL CHECK (action IN ('crash', 'error', 'drop', 'delay', 'trigger', 'naive')),
    probability  double precision NOT NULL DEFAULT 1 CHECK (probability >= 0 AND probability <= 1),
    params       jsonb NOT NULL DEFAULT '{}'::jsonb,
    seed         bigint NOT NULL DEFAULT 0,
    armed_at     timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Every armed fault expires (default 15 min, `pulse faults arm --ttl S`): a notebook or campaign killed between
-- arm and disarm must not leave a fault armed for good. Rows armed before this column existed get 15 minutes from
-- the migration. Guarded rather than a bare ADD COLUMN IF NOT EXISTS: that takes the table's exclusive lock on
-- every `pulse serve` start, queued behind the registries that read this table twice a second.
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = 'infra' AND table_name = 'faults'
                   AND column_name = 'expires_at') THEN
        ALTER TABLE infra.faults ADD COLUMN IF NOT EXISTS expires_at timestamptz NOT NULL
            DEFAULT clock_timestamp() + interval '15 minutes';
    END IF;
END $$;

-- One row per fault that struck, written (autocommit) before it acts: a crash is counted although
-- the process that logged it is gone a microsecond later.
CREATE TABLE IF NOT EXISTS infra.fault_log (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name      text NOT NULL,
    action    text NOT NULL,
    fired_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    pid       integer,
    context   jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX IF NOT EXISTS fault_log_name_idx ON infra.fault_log (name, fired_at);

-- Every event ever written to the outbox, kept after the relay deleted the row: the "published" set of the
-- delivery check (Jepsen's total queue). A trigger, so handlers keep writing only the outbox and only the
-- relay publishes; `redriven` marks events the saga watchdog re-emitted.
CREATE TABLE IF NOT EXISTS infra.event_log (
    event_id      uuid PRIMARY KEY,
    event_type    text NOT NULL,
    aggregate_id  text NOT NULL,
    redriven      boolean NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS event_log_aggregate_idx ON infra.event_log (aggregate_id);
-- A watchdog re-drive is meant for one queue only (payload redriveFor): the delivery check expects it there alone.
ALTER TABLE infra.event_log ADD COLUMN IF NOT EXISTS redrive_for text;

CREATE OR REPLACE FUNCTION infra.log_outbox_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO infra.event_log (event_id, event_type, aggregate_id, redriven, redrive_for)
    VALUES (NEW.id, NEW.event_type, NEW.aggregate_id, COALESCE((NEW.payload->>'redriven')::boolean, false),
            NEW.payload->>'redriveFor')
    ON CONFLICT (event_id) DO NOTHING;
    RETURN NEW;
END $$;

-- DDL only when missing: every `pulse serve` start migrates, and ALTER/CREATE TRIGGER would lock the busy
-- tables of the processes already running.
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'outbox_event_log') THEN
        CREATE TRIGGER outbox_event_log AFTER INSERT ON shared.outbox
            FOR EACH ROW EXECUTE FUNCTION infra.log_outbox_event();
    END IF;
END $$;

-- The initial stock of each product, for the conservation check: initial = available + units held by
-- RESERVED reservations. Recorded when the inventory row is created; rows older than this migration get
-- the value that the identity gives today.
CREATE TABLE IF NOT EXISTS infra.stock_baseline (
    product_id  uuid PRIMARY KEY,
    initial     integer NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);

CREATE OR REPLACE FUNCTION infra.record_stock_baseline() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO infra.stock_baseline (product_id, initial) VALUES (NEW.product_id, NEW.available_quantity)
    ON CONFLICT (product_id) DO NOTHING;
    RETURN NEW;
END $$;

DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'inventory_stock_baseline') THEN
        CREATE TRIGGER inventory_stock_baseline AFTER INSERT ON inventory.inventory_items
            FOR EACH ROW EXECUTE FUNCTION infra.record_stock_baseline();
    END IF;
END $$;

INSERT INTO infra.stock_baseline (product_id, initial)
SELECT i.product_id, i.available_quantity + COALESCE((
           SELECT SUM((item->>'quantity')::int) FROM inventory.reservations r,
                  jsonb_array_elements(r.items) item
           WHERE r.status = 'RESERVED' AND item->>'productId' = i.product_id::text), 0)
FROM inventory.inventory_items i
ON CONFLICT (product_id) DO NOTHING;

-- An out-of-stock decision is recorded too, so a re-driven trigger event cannot reserve an order that
-- already failed (and was perhaps refunded): inventory decides once per order.
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'reservations_status_check'
                   AND pg_get_constraintdef(oid) LIKE '%FAILED%') THEN
        ALTER TABLE inventory.reservations DROP CONSTRAINT IF EXISTS reservations_status_check;
        ALTER TABLE inventory.reservations ADD CONSTRAINT reservations_status_check
            CHECK (status IN ('RESERVED', 'RELEASED', 'FAILED'));
    END IF;
END $$;

-- Redeliveries an inbox absorbed, counted per event: the "duplicates" of the delivery check.
DO $$
DECLARE t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['inventory.inbox', 'orders.inbox', 'payment.inbox', 'orders.order_view_inbox',
                             'infra.redis_stock_inbox'] LOOP
        IF NOT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = split_part(t, '.', 1)
                       AND table_name = split_part(t, '.', 2) AND column_name = 'duplicates') THEN
            EXECUTE format('ALTER TABLE %s ADD COLUMN duplicates integer NOT NULL DEFAULT 0', t);
        END IF;
    END LOOP;
END $$;

-- What the saga watchdog re-drove, so it does not re-emit while its previous attempt is in flight.
CREATE TABLE IF NOT EXISTS infra.saga_redrives (
    order_id     uuid PRIMARY KEY,
    event_type   text NOT NULL,
    attempts     integer NOT NULL DEFAULT 1,
    redriven_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
