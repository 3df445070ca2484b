"""The calibrated box trust and the delay-diagnosis oracles' building blocks."""
import numpy as np
import pytest

from coop_perception.eval.ap import auroc
from coop_perception.eval.delay_diagnosis import Oracle, match_truth
from coop_perception.fusion.pipeline import FusedDetections
from coop_perception.fusion.trust import BOX_TRUST_FEATURES, ROI_ATTRIBUTES, BoxTrust, box_trust_features


def _attributes(rng, n):
    a = np.empty((n, len(ROI_ATTRIBUTES)))
    a[:, 0] = rng.uniform(0.3, 1.0, n)                 # score
    a[:, 1:5] = rng.uniform(0.01, 1.0, (n, 4))          # uncertainties
    a[:, 5] = rng.uniform(0.0, 0.6, n)                  # age, s
    a[:, 6] = a[:, 5] * rng.uniform(0, 15, n)           # displacement: speed x age, m
    a[:, 7] = rng.uniform(0.0, 60.0, n)                 # range, m
    return a


def test_box_trust_learns_that_old_fast_boxes_miss():
    rng = np.random.default_rng(0)
    a = _attributes(rng, 4000)
    # a box moved by speed x age misses IoU 0.7 when the displacement is large; score helps too
    p = 1 / (1 + np.exp(-(4 * (a[:, 0] - 0.6) - 1.5 * a[:, 6] + 2)))
    tp = rng.uniform(size=4000) < p
    trust = BoxTrust.fit(box_trust_features(a), tp)
    t = trust.trust(a)
    assert t.shape == (4000,) and ((t > 0) & (t < 1)).all()
    assert auroc(t, tp) > auroc(a[:, 0], tp) + 0.1     # better than the score alone
    fresh, stale = a[:1].copy(), a[:1].copy()
    fresh[0, 5:7], stale[0, 5:7] = (0.0, 0.0), (0.5, 5.0)      # 10 m/s
    assert trust.trust(stale)[0] < trust.trust(fresh)[0]
    again = BoxTrust.from_dict({**trust.to_dict(), 'calibrated_on': 'somewhere'})
    assert np.array_equal(again.trust(a), t)
    with pytest.raises(ValueError, match='features'):
        BoxTrust.from_dict({**trust.to_dict(), 'features': list(BOX_TRUST_FEATURES[:-1])})


def test_match_truth_is_one_to_one_within_the_gate_and_class():
    truth = np.array([[0, 0, 0, 4, 2, 1.5, 0], [10, 0, 0, 4, 2, 1.5, 0]], float)
    boxes = np.array([[0.5, 0, 0, 4, 2, 1.5, 0], [0.8, 0.2, 0, 4, 2, 1.5, 0], [10.2, 0, 0, 4, 2, 1.5, 0],
                      [20, 0, 0, 4, 2, 1.5, 0]], float)
    idx = match_truth(boxes, np.array([0, 0, 1, 0]), truth, np.array([0, 0]))
    assert list(idx) == [0, -1, -1, -1]                 # one box per object, same class, within 2 m


def test_choice_oracle_keeps_the_best_overlapping_box_with_the_best_score():
    truth = np.array([[0, 0, 0, 4, 2, 1.5, 0]], float)
    boxes = np.array([[0.6, 0, 0, 4, 2, 1.5, 0], [0.1, 0, 0, 4, 2, 1.5, 0], [30, 0, 0, 4, 2, 1.5, 0]], float)
    out = FusedDetections(boxes, np.array([0.9, 0.4, 0.5], np.float32), np.zeros(3, np.int64), np.zeros((3, 2)),
                          np.zeros(3), np.array([2, 4, 2]), stamp_ns=0, ages_s={})
    chosen = Oracle(None, True, 0.2).choose(out, truth, np.zeros(1, np.int64))
    assert len(chosen.boxes) == 2
    assert np.allclose(chosen.boxes[0], boxes[1]) and chosen.scores[0] == pytest.approx(0.9)
    assert Oracle(None, False, 0.2).choose(out, truth, np.zeros(1, np.int64)) is out
