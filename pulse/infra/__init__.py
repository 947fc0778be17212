"""Shared infrastructure: database, migrations, outbox, inbox, broker, Redis scripts, relays, workers."""
