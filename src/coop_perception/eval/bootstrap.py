"""How sure an AP difference is: a paired bootstrap over groups of frames.

Frames of one scene are strongly correlated (its egos see the same objects and events), so the
unit resampled is a group of frames, e.g. a scene (``APAccumulator.add_frame(group=...)``): each
resample draws the groups with replacement, and both
methods are scored on the same draw (paired), which cancels the scenes' difficulty from the
difference. AP is recomputed from the stored detections with each group weighted by how often it
was drawn; nothing is detected again.
"""
from __future__ import annotations

import numpy as np

from .ap import APAccumulator, voc_ap


def _sorted_class(acc: APAccumulator, cls: str, iou: float, groups: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> tp (n,) float of the class's detections in descending score order, their group index
    (n,) into ``groups``, ground-truth count per group (G,)."""
    k = list(acc.classes).index(cls)
    t = list(acc.iou_thresholds).index(iou)
    det = acc.detections()
    sel = det['labels'] == k
    order = np.argsort(-det['scores'][sel], kind='stable')
    index = {g: i for i, g in enumerate(groups)}
    to_groups = np.asarray([index[g] for g in acc.group_gt], np.int64)  # acc's group index -> ``groups``
    group = to_groups[det['group'][sel][order]] if sel.any() else np.zeros(0, np.int64)
    gt = np.array([acc.group_gt.get(g, np.zeros(len(acc.classes), np.int64))[k] for g in groups], np.float64)
    return det['tp'][sel, t][order].astype(np.float64), group, gt


def weighted_ap(tp: np.ndarray, group: np.ndarray, gt: np.ndarray, weights: np.ndarray) -> float | None:
    """AP of detections tp (n,) (descending score) whose groups (n,) count ``weights`` (G,) times
    each; None without ground truth."""
    n_gt = float(gt @ weights)
    if n_gt <= 0:
        return None
    w = weights[group]
    tp_c, fp_c = np.cumsum(w * tp), np.cumsum(w * (1.0 - tp))
    return voc_ap(tp_c / n_gt, tp_c / np.maximum(tp_c + fp_c, 1e-12)) if len(tp) else 0.0


def ap_difference(a: APAccumulator, b: APAccumulator, cls: str, iou: float, *, resamples: int = 1000,
                  seed: int = 0, level: float = 0.9) -> dict:
    """AP(a) - AP(b) for class ``cls`` at IoU ``iou``, both accumulated over the same groups ->
    {'difference', 'low', 'high' (the central ``level`` interval), 'level', 'resamples', 'groups'};
    the interval is None when the groups are too few to resample (< 2)."""
    groups = sorted(set(a.group_gt) | set(b.group_gt), key=repr)
    if set(a.group_gt) != set(b.group_gt):
        raise ValueError('a paired bootstrap needs both accumulators over the same groups')
    parts = [_sorted_class(acc, cls, iou, groups) for acc in (a, b)]
    ones = np.ones(len(groups))
    aps = [weighted_ap(*p, ones) for p in parts]
    out = {'difference': None if None in aps else aps[0] - aps[1], 'low': None, 'high': None,
           'level': level, 'resamples': resamples, 'groups': len(groups)}
    if out['difference'] is None or len(groups) < 2:
        return out
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(resamples):
        weights = np.bincount(rng.integers(0, len(groups), len(groups)), minlength=len(groups)).astype(np.float64)
        pair = [weighted_ap(*p, weights) for p in parts]
        if None not in pair:
            diffs.append(pair[0] - pair[1])
    lo, hi = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    out.update(low=float(lo), high=float(hi))
    return out
