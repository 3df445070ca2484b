"""Paired bootstrap of AP differences over groups of frames (eval.bootstrap)."""
import numpy as np
import pytest

from coop_perception.eval.ap import APAccumulator
from coop_perception.eval.bootstrap import ap_difference

CLASSES = ('car', 'truck', 'pedestrian', 'cyclist')


def box(x=0.0):
    return [x, 0.0, 0.0, 4.0, 2.0, 1.5, 0.0]


def run(groups: int, better_in: set, seed: int = 0) -> tuple[APAccumulator, APAccumulator]:
    """Two methods over ``groups`` groups of 3 frames, each frame with 2 cars. Method a finds
    both; method b finds both except in the groups ``better_in``, where its first box misses."""
    rng = np.random.default_rng(seed)
    a, b = APAccumulator(CLASSES), APAccumulator(CLASSES)
    for g in range(groups):
        for _ in range(3):
            gt = [box(0.0), box(20.0)]
            scores = rng.uniform(0.3, 1.0, 2)
            a.add_frame(gt, scores, [0, 0], gt, [0, 0], group=('scene', g))
            det_b = [box(5.0 if g in better_in else 0.0), box(20.0)]
            b.add_frame(det_b, scores, [0, 0], gt, [0, 0], group=('scene', g))
    return a, b


def test_the_point_difference_is_the_plain_ap_difference():
    a, b = run(8, {0, 3})
    d = ap_difference(a, b, 'car', 0.7, resamples=200)
    plain = a.ap()['car'][0.7] - b.ap()['car'][0.7]
    assert d['difference'] == pytest.approx(plain) and d['groups'] == 8
    assert d['low'] <= d['difference'] <= d['high']


def test_a_method_better_everywhere_has_an_interval_above_zero():
    a, b = run(10, set(range(10)))
    d = ap_difference(a, b, 'car', 0.7, resamples=300)
    assert d['low'] > 0


def test_a_lead_from_one_group_of_many_is_not_sure():
    a, b = run(20, {7})
    d = ap_difference(a, b, 'car', 0.7, resamples=300)
    assert d['difference'] > 0 and d['low'] == pytest.approx(0.0, abs=1e-9)
    same = ap_difference(a, a, 'car', 0.7, resamples=50)
    assert same['difference'] == same['low'] == same['high'] == 0.0


def test_unpaired_groups_are_refused_and_one_group_has_no_interval():
    a, _ = run(3, set())
    other, _ = run(4, set())
    with pytest.raises(ValueError, match='same groups'):
        ap_difference(a, other, 'car', 0.7)
    one, one_b = run(1, {0})
    d = ap_difference(one, one_b, 'car', 0.7)
    assert d['difference'] > 0 and d['low'] is None
