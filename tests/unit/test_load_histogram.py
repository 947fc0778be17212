import statistics

import numpy as np
import pytest

from pulse.tools.load import parse_mix
from pulse.tools.load_report import LatencyHistogram

# 3 significant digits: a value is stored within 0.1 % of itself (plus the 1 µs floor).
REL = 2e-3


def _filled(values_s):
    h = LatencyHistogram()
    for v in values_s:
        h.record(v)
    return h


def _nearest_rank(sorted_ms, p):
    """The textbook percentile HDR reports: the smallest value with at least p % of values at or below it."""
    rank = max(1, int(np.ceil(round(p / 100 * len(sorted_ms), 9))))  # round: 99.9 / 100 * 20000 is 19980.000000000004
    return sorted_ms[rank - 1]


@pytest.mark.parametrize("p", [50, 90, 99, 99.9])
def test_percentiles_match_numpy_on_a_lognormal_sample(p):
    rng = np.random.default_rng(7)
    values_s = rng.lognormal(mean=np.log(0.02), sigma=0.8, size=20_000)  # ~20 ms median, long tail
    h = _filled(values_s)
    expected_ms = _nearest_rank(np.sort(values_s * 1000), p)
    assert h.percentile_ms(p) == pytest.approx(expected_ms, rel=REL)
    # and close to numpy's interpolated percentile too (the sample is dense)
    assert h.percentile_ms(p) == pytest.approx(np.percentile(values_s * 1000, p), rel=0.02)


def test_known_uniform_data_gives_known_percentiles():
    values_s = [ms / 1000 for ms in range(1, 1001)]  # 1 ms .. 1000 ms, one each
    h = _filled(values_s)
    assert h.count == 1000
    assert h.percentile_ms(50) == pytest.approx(500, rel=REL)
    assert h.percentile_ms(90) == pytest.approx(900, rel=REL)
    assert h.percentile_ms(99) == pytest.approx(990, rel=REL)
    assert h.max_ms() == pytest.approx(1000, rel=REL)
    assert h.mean_ms() == pytest.approx(statistics.fmean(range(1, 1001)), rel=REL)


def test_summary_of_a_bimodal_sample_sees_the_tail():
    values_s = [0.005] * 980 + [0.250] * 20  # 2 % slow requests
    s = _filled(values_s).summary()
    assert s["count"] == 1000
    assert s["p50"] == pytest.approx(5, rel=REL)
    assert s["p90"] == pytest.approx(5, rel=REL)
    assert s["p99"] == pytest.approx(250, rel=REL)
    assert s["max"] == pytest.approx(250, rel=REL)


def test_merge_equals_recording_everything_in_one():
    a, b = _filled([0.001 * i for i in range(1, 501)]), _filled([0.001 * i for i in range(501, 1001)])
    merged = a.merge(b)
    whole = _filled([0.001 * i for i in range(1, 1001)])
    assert merged.count == 1000
    for p in (50, 90, 99):
        assert merged.percentile_ms(p) == whole.percentile_ms(p)


def test_empty_histogram_reports_none_not_zero():
    s = LatencyHistogram().summary()
    assert s == {"count": 0, "p50": None, "p90": None, "p99": None, "max": None, "mean": None}


def test_out_of_range_values_are_clamped_not_lost():
    h = _filled([0.0, 1e-9, 10_000.0])
    assert h.count == 3
    assert h.percentile_ms(1) == pytest.approx(0.001, rel=REL)


def test_parse_mix():
    assert parse_mix(None) == {"adds": 2, "abandon": 0.0}
    assert parse_mix("adds=3, abandon=0.25") == {"adds": 3, "abandon": 0.25}
    for bad in ("adds=0", "abandon=2", "carts=1", "adds=x", "adds"):
        with pytest.raises(ValueError):
            parse_mix(bad)
