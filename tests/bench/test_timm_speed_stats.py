"""The statistics of benchmarks/timm_speed.py: the ratio's bootstrap interval and the summary's
verdict on ratios above 1.0."""
import importlib.util
import os
import statistics

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def timm_speed():
    path = os.path.join(HERE, "..", "..", "benchmarks", "timm_speed.py")
    spec = importlib.util.spec_from_file_location("_timm_speed_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_interval_holds_the_ratio_and_is_reproducible(timm_speed):
    fx = [0.030, 0.031, 0.029, 0.035, 0.030, 0.032]
    tp = [0.027, 0.028, 0.026, 0.027, 0.033, 0.027]
    lo, hi = timm_speed.ratio_interval(fx, tp)
    ratio = statistics.median(fx) / statistics.median(tp)  # 1.13
    assert lo <= ratio <= hi and lo < hi
    assert 0.9 < lo and hi < 1.4
    assert (lo, hi) == timm_speed.ratio_interval(fx, tp)  # fixed seed


def test_a_constant_ratio_has_no_spread(timm_speed):
    assert timm_speed.ratio_interval([2.0] * 5, [1.0] * 5) == (2.0, 2.0)


def test_the_summary_tells_a_clear_excess_from_noise(timm_speed):
    def row(name, ratio, lo, hi):
        return {"model": name, "nodes": 10, "rounds": 9, "fx_s": ratio, "tp_s": 1.0, "ratio": ratio,
                "ratio_lo": lo, "ratio_hi": hi, "stages": {k: 0.0 for k in timm_speed.STAGES}}

    text = timm_speed.summary([row("clear", 1.10, 1.03, 1.18), row("noisy", 1.05, 0.95, 1.12),
                               row("fast", 0.50, 0.45, 0.55)])
    assert "max 1.10 (clear); 1/3 at or under 1.0" in text
    assert "1 above 1.0 as a whole (clear); 1 above 1.0 with an interval that reaches 1.0 (noisy)" in text
