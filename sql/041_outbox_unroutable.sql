-- Set by a relay when RabbitMQ returned the event as unroutable (no queue bound to its type): the row stays,
-- is reported, and is retried at a slow interval instead of being confirmed and deleted (SPEC §2).
ALTER TABLE shared.outbox ADD COLUMN IF NOT EXISTS unroutable_at timestamptz;
-- The retry pass and the reports look up the few marked rows without walking a backlog of unmarked ones.
CREATE INDEX IF NOT EXISTS outbox_unroutable_idx ON shared.outbox (seq) WHERE unroutable_at IS NOT NULL;
