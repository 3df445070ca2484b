"""Average precision as OpenCOOD / CoDynTrust report it, accumulated frame by frame.

* Matching, per frame and class: detections in descending score order; each takes the remaining
  (not yet matched) ground-truth box of highest rotated BEV IoU and is a true positive when that
  IoU reaches the threshold, which removes the box; otherwise it is a false positive.
* Precision/recall over the whole split: all detections of a class are sorted by score across
  every frame before accumulating, and AP is the VOC all-point interpolated area.
* Boxes (detections and ground truth alike) count only within ``max_range`` metres (BEV distance)
  of the frame origin, i.e. of the ego sensor when boxes are given in its frame.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from coop_perception.geometry import bev_iou

IOU_THRESHOLDS = (0.3, 0.5, 0.7)
HEADLINE_CLASS = 'car'   # the class whose AP the cooperative results headline


def voc_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC all-point interpolation: area under the precision envelope (max precision at any
    recall >= r), with sentinels recall 0 -> precision 0 and recall 1 -> precision 0."""
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    step = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1
    return float(np.sum((mrec[step] - mrec[step - 1]) * mpre[step]))


def auroc(values: np.ndarray, positives: np.ndarray) -> float | None:
    """Area under the ROC curve of ``values`` ranking ``positives`` above the rest (ties count
    half; the Mann-Whitney U statistic). None when either group is empty."""
    values = np.asarray(values, np.float64)
    positives = np.asarray(positives, bool)
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(values, kind='stable')
    ranks = np.empty(len(values))
    sorted_vals = values[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_vals, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def match_frame(det_boxes: np.ndarray, det_scores: np.ndarray, gt_boxes: np.ndarray,
                iou_threshold: float) -> np.ndarray:
    """Greedy matching of one frame and class -> (N,) index of the matched ground-truth box per
    detection (input order), -1 for false positives."""
    matched = np.full(len(det_boxes), -1, np.int64)
    if len(det_boxes) == 0 or len(gt_boxes) == 0:
        return matched
    iou = bev_iou(det_boxes, gt_boxes)
    free = np.ones(len(gt_boxes), bool)
    for i in np.argsort(-np.asarray(det_scores), kind='stable'):
        if not free.any():
            break
        cand = np.where(free, iou[i], -1.0)
        j = int(np.argmax(cand))
        if cand[j] >= iou_threshold:
            matched[i] = j
            free[j] = False
    return matched


@dataclass
class APAccumulator:
    classes: Sequence[str]
    iou_thresholds: Sequence[float] = IOU_THRESHOLDS
    max_range: float | None = None  # m from the frame origin; None: no limit
    frames: int = 0
    _gt_count: np.ndarray = field(init=False, repr=False)
    _rows: list = field(default_factory=list, init=False, repr=False)
    # per group (add_frame's ``group``): ground-truth count per class, for resampling (eval.bootstrap)
    group_gt: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        self._gt_count = np.zeros(len(self.classes), np.int64)

    def add_frame(self, det_boxes: np.ndarray, det_scores: np.ndarray, det_labels: np.ndarray,
                  gt_boxes: np.ndarray, gt_labels: np.ndarray,
                  extra: dict[str, np.ndarray] | None = None, group=None) -> None:
        """One frame, everything in the same (ego) frame: detections (N, 7), (N,), (N,) and ground
        truth (M, 7), (M,) with labels indexing ``classes`` (others, e.g. -1, are ignored).
        ``extra``: per-detection arrays (N, ...) kept alongside for :meth:`detections`, e.g.
        uncertainty values. ``group``: a hashable naming the unit the frame belongs to (e.g. one
        scene seen by one ego), given for every frame or none; the detections' ``group`` is its
        index in ``group_gt`` (insertion order), for resampling."""
        det_boxes = np.asarray(det_boxes, np.float64).reshape(-1, 7)
        det_scores = np.asarray(det_scores, np.float64).reshape(-1)
        det_labels = np.asarray(det_labels, np.int64).reshape(-1)
        gt_boxes = np.asarray(gt_boxes, np.float64).reshape(-1, 7)
        gt_labels = np.asarray(gt_labels, np.int64).reshape(-1)
        extra = {k: np.asarray(v) for k, v in (extra or {}).items()}
        det_in, gt_in = self._in_range(det_boxes), self._in_range(gt_boxes)
        self.frames += 1
        if group is not None:
            counts = self.group_gt.setdefault(group, np.zeros(len(self.classes), np.int64))
            extra['group'] = np.full(len(det_boxes), list(self.group_gt).index(group))
        for k in range(len(self.classes)):
            g = gt_in & (gt_labels == k)
            self._gt_count[k] += int(g.sum())
            if group is not None:
                counts[k] += int(g.sum())
            d = np.flatnonzero(det_in & (det_labels == k))
            if len(d) == 0:
                continue
            gt_k = gt_boxes[g]
            matched = np.stack([match_frame(det_boxes[d], det_scores[d], gt_k, t)
                                for t in self.iou_thresholds], 1)  # (n, T)
            hit = matched >= 0
            gt_match = np.full(matched.shape + (7,), np.nan)  # (n, T, 7)
            gt_match[hit] = gt_k[matched[hit]]
            self._rows.append((det_scores[d], np.full(len(d), k), det_boxes[d], hit, gt_match,
                               {name: v[d] for name, v in extra.items()}))

    def _in_range(self, boxes: np.ndarray) -> np.ndarray:
        if self.max_range is None:
            return np.ones(len(boxes), bool)
        return np.hypot(boxes[:, 0], boxes[:, 1]) <= self.max_range

    def gt_counts(self) -> dict[str, int]:
        return {c: int(n) for c, n in zip(self.classes, self._gt_count)}

    def detections(self) -> dict[str, np.ndarray]:
        """All accumulated in-range detections: scores (N,), labels (N,), boxes (N, 7),
        tp (N, T) per IoU threshold, matched_gt (N, T, 7) (NaN for false positives), and each
        ``extra`` array given to add_frame."""
        T = len(self.iou_thresholds)
        if not self._rows:
            return {'scores': np.zeros(0), 'labels': np.zeros(0, np.int64), 'boxes': np.zeros((0, 7)),
                    'tp': np.zeros((0, T), bool), 'matched_gt': np.zeros((0, T, 7))}
        cols = list(zip(*self._rows))
        out = {'scores': np.concatenate(cols[0]), 'labels': np.concatenate(cols[1]).astype(np.int64),
               'boxes': np.concatenate(cols[2]), 'tp': np.concatenate(cols[3]),
               'matched_gt': np.concatenate(cols[4])}
        for name in cols[5][0]:
            out[name] = np.concatenate([e[name] for e in cols[5]])
        return out

    def ap(self) -> dict[str, dict[float, float | None]]:
        """AP per class and IoU threshold; None for a class without ground truth in range."""
        det = self.detections()
        result = {}
        for k, name in enumerate(self.classes):
            n_gt = int(self._gt_count[k])
            sel = det['labels'] == k
            order = np.argsort(-det['scores'][sel], kind='stable')
            per_t = {}
            for ti, t in enumerate(self.iou_thresholds):
                if n_gt == 0:
                    per_t[t] = None
                    continue
                tp = det['tp'][sel, ti][order].astype(np.float64)
                tp_c, fp_c = np.cumsum(tp), np.cumsum(1.0 - tp)
                per_t[t] = voc_ap(tp_c / n_gt, tp_c / np.maximum(tp_c + fp_c, 1e-12)) if len(tp) else 0.0
            result[name] = per_t
        return result

    def summary(self) -> dict:
        """JSON-ready: {'ap': {class: {'0.3': ..}}, 'mean': {'0.3': ..}, 'gt': {class: n}, 'frames': n};
        'mean' averages the classes that have ground truth (None if none has)."""
        ap = self.ap()
        mean = {}
        for t in self.iou_thresholds:
            vals = [v[t] for v in ap.values() if v[t] is not None]
            mean[f'{t:g}'] = float(np.mean(vals)) if vals else None
        return {'ap': {c: {f'{t:g}': v for t, v in per.items()} for c, per in ap.items()},
                'mean': mean, 'gt': self.gt_counts(), 'frames': self.frames}


def format_ap_table(summary: dict) -> str:
    """APAccumulator.summary() -> a printable table, one row per class plus the class mean."""
    thresholds = list(summary['mean'])
    fmt = lambda v: f'{100 * v:>8.1f}' if v is not None else f"{'n/a':>8}"  # noqa: E731
    lines = [f"{'class':<12}{'GT':>7}" + ''.join(f'{"AP@" + t:>8}' for t in thresholds)]
    for cls, per in summary['ap'].items():
        lines.append(f"{cls:<12}{summary['gt'].get(cls, 0):>7}" + ''.join(fmt(per[t]) for t in thresholds))
    lines.append(f"{'mean':<12}{'':>7}" + ''.join(fmt(summary['mean'][t]) for t in thresholds))
    lines.append(f"({summary['frames']} frames; AP in %, BEV rotated IoU, VOC all-point)")
    return '\n'.join(lines)
