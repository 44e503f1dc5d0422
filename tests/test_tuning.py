"""The shared knob search (omnicache.tuning) on synthetic fraction functions: no model runs.

Its rules: integer knobs scanned upward until below the band; float knobs bisected (a
bracket from the memo, an unbounded ``hi`` widened, a bounded one never passed), stopping
within tolerance / 3; "target" knobs measured and moved one step when outside the band;
ties by evaluation order or by the lower knob.
"""

import math

import pytest

from omnicache.tuning import Knob, nearest_setting, scan


class Recorder:
    """``fraction(knob)`` that records the order of the evaluated knobs."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, knob):
        self.calls.append(knob)
        return self.fn(knob)


def test_int_scan_stops_below_the_band():
    f = Recorder(lambda n: 1.0 / n)  # 1, .5, .333, .25, ...
    assert nearest_setting(f, 0.3, Knob("int", 1, 12), tolerance=0.03) == 3
    assert f.calls == [1, 2, 3, 4]  # 1/4 < 0.3 - 0.03: the scan stops there
    f = Recorder(lambda n: 1.0 / n)
    assert nearest_setting(f, 0.05, Knob("int", 1, 12), tolerance=0.03) == 12  # never below: the whole range
    assert f.calls == list(range(1, 13))


def test_int_scan_ties_go_to_the_first():
    fractions = {1: 1.0, 2: 0.6, 3: 0.6, 4: 0.4, 5: 0.2}
    assert nearest_setting(fractions.get, 0.5, Knob("int", 1, 5), tolerance=0.03) == 2  # 2, 3, 4 all 0.1 away


def test_float_bisection_stops_within_a_third_of_the_tolerance():
    f = Recorder(lambda k: 1.0 / (1.0 + k))
    best = nearest_setting(f, 0.4, Knob("float", 0.0, 4.0), tolerance=0.03)
    assert f.calls == [2.0, 1.0, 1.5] and best == 1.5  # f(1.5) = 0.4: within 0.01, stop
    f = Recorder(lambda k: 1.0 / (1.0 + k))
    best = nearest_setting(f, 0.37, Knob("float", 0.0, 4.0), tolerance=0.03, bisections=3)
    assert len(f.calls) == 3 and best == min(f.calls, key=lambda k: abs(1 / (1 + k) - 0.37))


def test_float_unbounded_hi_is_widened():
    f = Recorder(lambda k: 1.0 / (1.0 + k))  # 0.2 needs k = 4, beyond the first bracket [0, 1]
    best = nearest_setting(f, 0.2, Knob("float", 0.0, 1.0), tolerance=0.03, bisections=8, widen=4, tie="lowest")
    assert f.calls[:2] == [1.0, 4.0]  # hi tried, then widened 4x
    assert abs(1.0 / (1.0 + best) - 0.2) <= 0.01
    f = Recorder(lambda k: 1.0 / (1.0 + k))  # without widening, the bracket stays [0, 1]
    best = nearest_setting(f, 0.2, Knob("float", 0.0, 1.0), tolerance=0.03, bisections=8)
    assert max(f.calls) < 1.0 and best == max(f.calls)


def test_float_bounded_knob_never_leaves_its_range():
    f = Recorder(lambda k: 1.0 / (1.0 + k))
    best = nearest_setting(f, 0.4, Knob("float", 0.0, 1.0, bounded=True), tolerance=0.03, bisections=8, widen=4)
    assert f.calls == [1.0] and best == 1.0  # the end of the range is the nearest it can reach
    f = Recorder(lambda k: 1.0 / (1.0 + k))
    best = nearest_setting(f, 0.6, Knob("float", 0.0, 1.0, bounded=True), tolerance=0.03, bisections=8, widen=4)
    assert max(f.calls) == 1.0 and abs(1.0 / (1.0 + best) - 0.6) <= 0.01  # reachable: bisected inside


def test_float_memo_brackets_later_targets():
    memo = {}
    f = Recorder(lambda k: 1.0 / (1.0 + k))
    first = nearest_setting(f, 0.5, Knob("float", 0.0, 4.0), tolerance=0.03, memo=memo, widen=4, tie="lowest")
    assert first == 1.0 and list(memo) == [4.0, 2.0, 1.0]  # hi, then bisection
    f.calls.clear()
    second = nearest_setting(f, 0.4, Knob("float", 0.0, 4.0), tolerance=0.03, memo=memo, widen=4, tie="lowest")
    assert f.calls == [1.5] and second == 1.5  # bracketed by the memo: (1, 2) -> one midpoint
    assert nearest_setting(f, 0.5, Knob("float", 0.0, 4.0), tolerance=0.03, memo=memo) == 1.0  # no new run
    assert f.calls == [1.5]


@pytest.mark.parametrize("tie, expected", [("first", 0.5), ("lowest", 0.25)])
def test_float_ties(tie, expected):
    flat = Recorder(lambda k: 0.45)  # a plateau below the target: every point equally near
    best = nearest_setting(flat, 0.5, Knob("float", 0.0, 1.0), tolerance=0.03, bisections=2, tie=tie)
    assert flat.calls == [0.5, 0.25] and best == expected


def test_target_knob_moves_one_step_outside_the_band():
    steps = 8
    rounded_up = Recorder(lambda k: math.ceil(k * steps) / steps + 1 / steps)  # one step too many
    best = nearest_setting(rounded_up, 0.5, Knob("target", 0, 1), tolerance=0.03, step=1 / steps)
    assert rounded_up.calls == [0.5, 0.375] and best == 0.375
    exact = Recorder(lambda k: k)
    assert nearest_setting(exact, 0.5, Knob("target", 0, 1), tolerance=0.03, step=1 / steps) == 0.5
    assert exact.calls == [0.5]  # inside the band: nothing else tried
    low = Recorder(lambda k: 0.5)
    assert nearest_setting(low, 0.95, Knob("target", 0, 1), tolerance=0.03, step=0.1) == 0.95
    assert low.calls == [0.95]  # 1.05 is outside (lo, hi]: not tried
    with pytest.raises(ValueError, match="step"):
        nearest_setting(exact, 0.5, Knob("target", 0, 1))


def test_exact_knob_is_the_target_without_a_run():
    f = Recorder(lambda k: k)
    assert nearest_setting(f, 0.4, Knob("exact", 0.0, 1.0)) == 0.4 and f.calls == []
    with pytest.raises(ValueError, match="Knob.kind"):
        Knob("log", 0, 1)


def test_scan_with_a_score_picks_the_best_inside_the_band():
    fractions = {"a": 0.9, "b": 0.52, "c": 0.49, "d": 0.51, "e": 0.3}
    scores = {"b": 30.0, "c": 31.0, "d": 31.0}
    scored = Recorder(scores.get)
    assert scan(fractions, fractions.get, 0.5, 0.03, score=scored) == ("c", 3)  # c and d tie: the first
    assert scored.calls == ["b", "c", "d"]  # only the candidates inside the band are scored
    assert scan(fractions, fractions.get, 0.75, 0.03, score=scored) == ("a", 0)  # none inside: the nearest


def test_tune_to_fraction_uses_the_search():
    """``omnicache eval --compute-fraction``'s search on a stand-in bench (no model)."""
    from omnicache.evaluate import tune_to_fraction
    from omnicache.policies import FirstBlockCacheConfig, FORAConfig, OmniCacheConfig

    class Bench:
        def __init__(self):
            self.seen = []

        def compute_fraction(self, config):
            self.seen.append(config)
            if isinstance(config, FORAConfig):
                return 1.0 / config.interval
            return 1.0 / (1.0 + 4 * config.threshold)

    bench = Bench()
    assert tune_to_fraction(bench, "fora", 0.3) == FORAConfig(interval=3)
    assert [c.interval for c in bench.seen] == [1, 2, 3, 4]
    bench = Bench()
    cfg = tune_to_fraction(bench, "fbcache", 0.4)
    assert isinstance(cfg, FirstBlockCacheConfig) and abs(1.0 / (1.0 + 4 * cfg.threshold) - 0.4) <= 0.01
    assert [c.threshold for c in bench.seen][:2] == [1.0, 0.5]  # bisection from [0, 2]
    bench = Bench()
    assert tune_to_fraction(bench, "omnicache", 0.45) == OmniCacheConfig(compute_fraction=0.45) and not bench.seen
