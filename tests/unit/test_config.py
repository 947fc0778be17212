"""Settings from the environment (SPEC §7): defaults, parsing, and errors that name the variable."""

import dataclasses

import pytest

from pulse import config
from pulse.config import ConfigError, Settings, from_env


def one_sentence(text: str) -> bool:
    return bool(text) and "\n" not in text and text.endswith(".") and "Traceback" not in text


def test_an_empty_environment_gives_the_loopback_defaults():
    s = from_env({})
    assert s == Settings()
    assert s.database_url == "postgresql://postgres:postgres@127.0.0.1:5432/pulse"
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert s.amqp_url == "amqp://guest:guest@127.0.0.1:5672/%2F"
    assert s.strategy == "optimistic" and s.strategy_name == "OPTIMISTIC"
    assert s.outbox_mode in config.OUTBOX_MODES
    assert s.payment_decline_rate == 0.0
    assert s.reconcile_cooldown_s == 10.0 and s.sweep_interval_s == 60.0 and s.reconcile_interval_s == 300.0
    assert s.idempotency_lock_ttl_s == 10
    assert s.naive == frozenset()


def test_empty_values_count_as_unset():
    assert from_env({"PULSE_STRATEGY": "", "PULSE_PAYMENT_DECLINE_RATE": "", "PULSE_DATABASE_URL": ""}) == Settings()


def test_every_variable_is_read():
    s = from_env(
        {
            "PULSE_DATABASE_URL": "postgresql://u@db:5433/x",
            "PULSE_REDIS_URL": "redis://r:6380/3",
            "PULSE_AMQP_URL": "amqp://a:b@mq:5673/v",
            "PULSE_STRATEGY": "post-payment",
            "PULSE_OUTBOX_MODE": "cdc",
            "PULSE_PAYMENT_DECLINE_RATE": "0.25",
            "PULSE_PAYMENT_LATENCY_MS": "12.5",
            "PULSE_PAYMENT_ERROR_RATE": "0.1",
            "PULSE_PAYMENT_SEED": "7",
            "PULSE_CART_TTL_S": "30",
            "PULSE_SWEEP_INTERVAL_S": "5",
            "PULSE_RECONCILE_INTERVAL_S": "6",
            "PULSE_RECONCILE_COOLDOWN_S": "2",
            "PULSE_CONSUMER_PREFETCH": "10",
            "PULSE_CONSUMER_THREADS": "3",
            "PULSE_RELAY_BATCH": "100",
            "PULSE_RELAY_POLL_S": "0.5",
            "PULSE_CDC_SLOT": "slot_x",
            "PULSE_CDC_PUBLICATION": "pub_x",
            "PULSE_NAIVE": " no-inbox, unguarded-state ,,",
        }
    )
    assert (s.database_url, s.redis_url, s.amqp_url) == (
        "postgresql://u@db:5433/x",
        "redis://r:6380/3",
        "amqp://a:b@mq:5673/v",
    )
    assert s.strategy == "post-payment" and s.strategy_name == "POST_PAYMENT" and s.outbox_mode == "cdc"
    assert (s.payment_decline_rate, s.payment_latency_ms, s.payment_error_rate, s.payment_seed) == (0.25, 12.5, 0.1, 7)
    assert (s.cart_ttl_s, s.sweep_interval_s, s.reconcile_interval_s, s.reconcile_cooldown_s) == (30, 5, 6, 2)
    assert (s.consumer_prefetch, s.consumer_threads, s.relay_batch, s.relay_poll_s) == (10, 3, 100, 0.5)
    assert (s.cdc_slot, s.cdc_publication) == ("slot_x", "pub_x")
    assert s.naive == {"no-inbox", "unguarded-state"}


@pytest.mark.parametrize("raw", ["post-payment", "POST_PAYMENT", "Post_Payment", "POST-PAYMENT"])
def test_strategy_spellings(raw):
    assert from_env({"PULSE_STRATEGY": raw}).strategy == "post-payment"


def test_outbox_mode_is_case_insensitive():
    assert from_env({"PULSE_OUTBOX_MODE": "POLLING"}).outbox_mode == "polling"


@pytest.mark.parametrize(
    "env, variable",
    [
        ({"PULSE_STRATEGY": "pessimistic"}, "PULSE_STRATEGY"),
        ({"PULSE_OUTBOX_MODE": "kafka"}, "PULSE_OUTBOX_MODE"),
        ({"PULSE_PAYMENT_DECLINE_RATE": "lots"}, "PULSE_PAYMENT_DECLINE_RATE"),
        ({"PULSE_PAYMENT_DECLINE_RATE": "1.5"}, "PULSE_PAYMENT_DECLINE_RATE"),
        ({"PULSE_PAYMENT_DECLINE_RATE": "-0.1"}, "PULSE_PAYMENT_DECLINE_RATE"),
        ({"PULSE_PAYMENT_ERROR_RATE": "2"}, "PULSE_PAYMENT_ERROR_RATE"),
        ({"PULSE_CART_TTL_S": "15 minutes"}, "PULSE_CART_TTL_S"),
        ({"PULSE_PAYMENT_SEED": "abc"}, "PULSE_PAYMENT_SEED"),
    ],
)
def test_bad_values_are_one_sentence_naming_the_variable(env, variable):
    with pytest.raises(ConfigError) as err:
        from_env(env)
    message = str(err.value)
    assert variable in message and one_sentence(message), message
    assert repr(list(env.values())[0]) in message or list(env.values())[0] in message


def test_decline_rate_bounds_are_inclusive():
    assert from_env({"PULSE_PAYMENT_DECLINE_RATE": "0"}).payment_decline_rate == 0
    assert from_env({"PULSE_PAYMENT_DECLINE_RATE": "1"}).payment_decline_rate == 1


def test_replace_validates_like_from_env():
    s = Settings()
    assert s.replace(strategy="post-payment").strategy_name == "POST_PAYMENT"
    assert s.strategy == "optimistic"  # a copy: the original is unchanged
    with pytest.raises(ConfigError, match="PULSE_STRATEGY"):
        s.replace(strategy="sideways")
    with pytest.raises(ConfigError, match="PULSE_PAYMENT_DECLINE_RATE"):
        s.replace(payment_decline_rate=3.0)


def test_settings_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().strategy = "post-payment"


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize(
    "variable, value",
    [
        ("PULSE_CONSUMER_THREADS", "0"),  # no consumer at all: every saga would stall silently
        ("PULSE_RELAY_BATCH", "0"),
        ("PULSE_CONSUMER_PREFETCH", "-1"),
        ("PULSE_CART_TTL_S", "-5"),
        ("PULSE_SWEEP_INTERVAL_S", "0"),  # a scheduler that never sleeps
        ("PULSE_RECONCILE_INTERVAL_S", "-1"),
        ("PULSE_RECONCILE_COOLDOWN_S", "-1"),
        ("PULSE_RELAY_POLL_S", "-0.1"),
        ("PULSE_PAYMENT_LATENCY_MS", "-10"),
    ],
)
def test_counts_and_durations_out_of_range_are_rejected(variable, value):
    with pytest.raises(ConfigError) as err:
        from_env({variable: value})
    assert variable in str(err.value) and one_sentence(str(err.value)), str(err.value)


def test_zero_where_zero_makes_sense_is_accepted():
    s = from_env(
        {
            "PULSE_RECONCILE_COOLDOWN_S": "0",
            "PULSE_RELAY_POLL_S": "0",
            "PULSE_PAYMENT_LATENCY_MS": "0",
            "PULSE_CONSUMER_PREFETCH": "0",
        }
    )
    assert (s.reconcile_cooldown_s, s.relay_poll_s, s.payment_latency_ms, s.consumer_prefetch) == (0, 0, 0, 0)


def test_replace_rejects_a_lock_ttl_redis_cannot_set():
    with pytest.raises(ConfigError, match="(?i)idempotency"):
        Settings().replace(idempotency_lock_ttl_s=0)
