"""The simulated payment provider: seeded, reproducible, per-order idempotent, controllable."""

import time
import uuid

import pytest

from pulse.payment.provider import ChargeResult, ProviderError, SimulatedProvider

ORDERS = [uuid.UUID(int=n) for n in range(10_000)]


def declined(provider, orders=ORDERS):
    return {o for o in orders if not provider.charge(o, "10.00").approved}


def test_same_seed_same_declines():
    a = declined(SimulatedProvider(decline_rate=0.3, seed=7))
    b = declined(SimulatedProvider(decline_rate=0.3, seed=7))
    assert a == b and a


def test_another_seed_other_declines():
    a = declined(SimulatedProvider(decline_rate=0.3, seed=7))
    b = declined(SimulatedProvider(decline_rate=0.3, seed=8))
    assert a != b


@pytest.mark.parametrize("rate", [0.05, 0.3, 0.5, 0.9])
def test_decline_rate_is_met_over_ten_thousand_orders(rate):
    observed = len(declined(SimulatedProvider(decline_rate=rate, seed=42))) / len(ORDERS)
    assert abs(observed - rate) < 0.02, observed


def test_rate_zero_never_declines_and_one_always_does():
    assert declined(SimulatedProvider(decline_rate=0.0), ORDERS[:500]) == set()
    assert declined(SimulatedProvider(decline_rate=1.0), ORDERS[:500]) == set(ORDERS[:500])


def test_a_retried_charge_of_one_order_gets_the_same_answer():
    provider = SimulatedProvider(decline_rate=0.5, seed=1)
    for order in ORDERS[:200]:
        first, again = provider.charge(order, "5.00"), provider.charge(order, "5.00")
        assert first == again
        assert first.provider_payment_id == f"sim_{order}"


def test_a_higher_rate_declines_a_superset():
    low = declined(SimulatedProvider(decline_rate=0.2, seed=3), ORDERS[:2000])
    high = declined(SimulatedProvider(decline_rate=0.6, seed=3), ORDERS[:2000])
    assert low < high


def test_error_rate_one_always_raises_and_zero_never():
    with pytest.raises(ProviderError):
        SimulatedProvider(error_rate=1.0).charge(ORDERS[0], "1.00")
    provider = SimulatedProvider(error_rate=0.0)
    assert all(isinstance(provider.charge(o, "1.00"), ChargeResult) for o in ORDERS[:100])


def test_errors_follow_the_seed():
    def pattern(seed):
        provider, out = SimulatedProvider(error_rate=0.5, seed=seed), []
        for order in ORDERS[:100]:
            try:
                provider.charge(order, "1.00")
                out.append(True)
            except ProviderError:
                out.append(False)
        return out

    assert pattern(5) == pattern(5) and not all(pattern(5)) and any(pattern(5))


def test_latency_is_spent_around_the_setting():
    provider = SimulatedProvider(latency_ms=40)
    started = time.perf_counter()
    for order in ORDERS[:5]:
        provider.charge(order, "1.00")
    per_charge_ms = (time.perf_counter() - started) * 1000 / 5
    assert 20 <= per_charge_ms <= 100, per_charge_ms


def test_refunds_always_succeed():
    assert SimulatedProvider(decline_rate=1.0).refund(ORDERS[0], "sim_x") == "re_sim_x"
