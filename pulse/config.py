"""Settings read from the environment (SPEC §7), with loopback defaults so a fresh machine needs none."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

STRATEGIES = {"optimistic": "OPTIMISTIC", "post-payment": "POST_PAYMENT"}
OUTBOX_MODES = ("cdc", "polling")
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A setting has a value the system cannot run with; the message names the variable."""


@dataclasses.dataclass(frozen=True)
class Settings:
    database_url: str = "postgresql://postgres:postgres@127.0.0.1:5432/pulse"
    redis_url: str = "redis://127.0.0.1:6379/0"
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"
    strategy: str = "optimistic"
    outbox_mode: str = "cdc"
    payment_decline_rate: float = 0.0
    payment_latency_ms: float = 0.0
    payment_error_rate: float = 0.0
    payment_seed: int = 42
    cart_ttl_s: float = 900.0
    sweep_interval_s: float = 60.0
    reconcile_interval_s: float = 300.0
    reconcile_cooldown_s: float = 10.0
    idempotency_lock_ttl_s: int = 10
    consumer_prefetch: int = 50
    consumer_threads: int = 1
    handler_retries: int = 5
    relay_batch: int = 500
    relay_poll_s: float = 0.05
    cdc_slot: str = "pulse_outbox_slot"
    cdc_publication: str = "pulse_outbox_pub"
    naive: frozenset[str] = frozenset()
    # Lab mode (PULSE_LAB=1, pulse serve --lab): only then are faults and naive switches obeyed.
    lab: bool = False

    @property
    def strategy_name(self) -> str:
        """The strategy as the API and the orders table spell it (OPTIMISTIC, POST_PAYMENT)."""
        return STRATEGIES[self.strategy]

    def replace(self, **changes: Any) -> Settings:
        """A copy with some settings changed, validated like the original."""
        return _validated(dataclasses.replace(self, **changes))


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}.") from None


# Zero consumer threads would stall every saga silently and a zero interval makes a scheduler spin.
_AT_LEAST = {
    "consumer_threads": 1,
    "relay_batch": 1,
    "handler_retries": 1,
    "idempotency_lock_ttl_s": 1,
    "consumer_prefetch": 0,
    "reconcile_cooldown_s": 0,
    "relay_poll_s": 0,
    "payment_latency_ms": 0,
}
_POSITIVE = ("cart_ttl_s", "sweep_interval_s", "reconcile_interval_s")


def _validated(s: Settings) -> Settings:
    if s.strategy not in STRATEGIES:
        raise ConfigError(f"PULSE_STRATEGY must be one of {', '.join(STRATEGIES)}, got {s.strategy!r}.")
    if s.outbox_mode not in OUTBOX_MODES:
        raise ConfigError(f"PULSE_OUTBOX_MODE must be one of {', '.join(OUTBOX_MODES)}, got {s.outbox_mode!r}.")
    for name in ("payment_decline_rate", "payment_error_rate"):
        if not 0.0 <= getattr(s, name) <= 1.0:
            raise ConfigError(f"PULSE_{name.upper()} must be between 0 and 1, got {getattr(s, name)}.")
    for name, least in _AT_LEAST.items():
        if getattr(s, name) < least:
            raise ConfigError(f"PULSE_{name.upper()} must be at least {least}, got {getattr(s, name)}.")
    for name in _POSITIVE:
        if getattr(s, name) <= 0:
            raise ConfigError(f"PULSE_{name.upper()} must be greater than 0, got {getattr(s, name)}.")
    return s


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = (env.get(name) or "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ConfigError(f"{name} must be 1 or 0, got {raw!r}.")


def from_env(env: Mapping[str, str] | None = None) -> Settings:
    """Build :class:`Settings` from ``PULSE_*`` environment variables (defaults: services on 127.0.0.1)."""
    env = os.environ if env is None else env
    d = Settings()
    naive = frozenset(n.strip() for n in env.get("PULSE_NAIVE", "").split(",") if n.strip())
    return _validated(
        Settings(
            database_url=env.get("PULSE_DATABASE_URL") or d.database_url,
            redis_url=env.get("PULSE_REDIS_URL") or d.redis_url,
            amqp_url=env.get("PULSE_AMQP_URL") or d.amqp_url,
            strategy=(env.get("PULSE_STRATEGY") or d.strategy).lower().replace("_", "-"),
            outbox_mode=(env.get("PULSE_OUTBOX_MODE") or d.outbox_mode).lower(),
            payment_decline_rate=_float(env, "PULSE_PAYMENT_DECLINE_RATE", d.payment_decline_rate),
            payment_latency_ms=_float(env, "PULSE_PAYMENT_LATENCY_MS", d.payment_latency_ms),
            payment_error_rate=_float(env, "PULSE_PAYMENT_ERROR_RATE", d.payment_error_rate),
            payment_seed=int(_float(env, "PULSE_PAYMENT_SEED", d.payment_seed)),
            cart_ttl_s=_float(env, "PULSE_CART_TTL_S", d.cart_ttl_s),
            sweep_interval_s=_float(env, "PULSE_SWEEP_INTERVAL_S", d.sweep_interval_s),
            reconcile_interval_s=_float(env, "PULSE_RECONCILE_INTERVAL_S", d.reconcile_interval_s),
            reconcile_cooldown_s=_float(env, "PULSE_RECONCILE_COOLDOWN_S", d.reconcile_cooldown_s),
            consumer_prefetch=int(_float(env, "PULSE_CONSUMER_PREFETCH", d.consumer_prefetch)),
            consumer_threads=int(_float(env, "PULSE_CONSUMER_THREADS", d.consumer_threads)),
            relay_batch=int(_float(env, "PULSE_RELAY_BATCH", d.relay_batch)),
            relay_poll_s=_float(env, "PULSE_RELAY_POLL_S", d.relay_poll_s),
            idempotency_lock_ttl_s=int(_float(env, "PULSE_IDEMPOTENCY_LOCK_TTL_S", d.idempotency_lock_ttl_s)),
            cdc_slot=env.get("PULSE_CDC_SLOT") or d.cdc_slot,
            cdc_publication=env.get("PULSE_CDC_PUBLICATION") or d.cdc_publication,
            naive=naive,
            lab=_flag(env, "PULSE_LAB"),
        )
    )
