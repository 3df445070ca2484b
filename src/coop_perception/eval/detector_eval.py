"""Single-agent detector evaluation: AP plus how well the uncertainty outputs work.

Uncertainty quality (issue 4): for every uncertainty column, the AUROC of separating false from
true positives (higher uncertainty should mean false positive) next to that of the score, and on
true positives the rank correlation of predicted centre variance with the actual squared centre
error.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import spearmanr
from tqdm import tqdm

from ..detection.decode import UNCERTAINTY_FIELDS, corner_variance
from ..detection.model import Detector
from ..detection.train import TrainExample
from ..geometry import bev_iou
from .ap import IOU_THRESHOLDS, APAccumulator, auroc

# The single number reported as "uncertainty_auroc": the aleatoric variance of a box corner (the
# regression uncertainty the fusion's trust modulus receives). Chosen on the val split, before any
# test number existed: there the class-logit variance and the MC entropy ranked false positives
# *below* true positives (AUROC 0.06 and 0.30 at 2000 iterations) while the regression variances
# separated them (0.77-0.83).
HEADLINE_UNCERTAINTY = 'ale_corner'
UNCERTAINTY_IOU = 0.5  # what counts as a true positive for the uncertainty metrics
# False detections a user sees: those drawn in the BEV pictures (score >= 0.3) that match no ground
# truth of their class at IoU 0.5 (duplicates included), per scan.
FALSE_POSITIVE_SCORE = 0.3
# A false detection overlapping a ground-truth box by at least this much is a badly placed box (of
# that object's class: 'loose'; of another class: 'other_class'); below it, 'nothing_there'.
FALSE_POSITIVE_NEAR_IOU = 0.1


def evaluate_detector(model: Detector, examples: Sequence, *, max_range: float | None = None,
                      progress: bool = True) -> dict:
    """Detect on every example (sensor-frame scan + ground truth, e.g. AgentViewExamples) ->
    JSON-ready {'ap', 'mean', 'gt', 'frames', 'uncertainty_auroc', 'uncertainty',
    'false_positives_per_scan', 'false_positive_kinds_per_scan', 'latency_ms'}."""
    acc = APAccumulator(model.cfg.classes, IOU_THRESHOLDS, max_range)
    totals = []
    for i in tqdm(range(len(examples)), desc='eval detector', unit='scan', disable=not progress):
        ex = TrainExample(*examples[i])
        det = model.detect(ex.points, ex.sensor_height, ages=ex.ages)
        totals.append(det.timings_ms['total'])
        acc.add_frame(det.boxes, det.scores, det.labels, ex.boxes, ex.labels,
                      extra={**{name: det.uncertainty[:, j] for j, name in enumerate(UNCERTAINTY_FIELDS)},
                             'ale_corner': corner_variance(det.uncertainty, det.boxes),
                             **nearest_ground_truth(det.boxes, det.labels, ex.boxes, ex.labels)})
    out = acc.summary()
    det, t = acc.detections(), list(acc.iou_thresholds).index(UNCERTAINTY_IOU)
    quality = uncertainty_quality(det, t)
    out['uncertainty_auroc'] = quality['auroc'][HEADLINE_UNCERTAINTY]
    out['uncertainty'] = quality
    out['false_positives_per_scan'] = false_positives_per_scan(det, t, model.cfg.classes, acc.frames)
    out['false_positive_kinds_per_scan'] = false_positive_kinds(det, t, model.cfg.classes, acc.frames)
    out['latency_ms'] = {'median': float(np.median(totals)) if totals else None}
    return out


def false_positives_per_scan(det: dict[str, np.ndarray], t: int, classes: Sequence[str], frames: int) -> dict:
    """From APAccumulator.detections() and IoU column ``t``: per class (and 'all') the detections
    with score >= FALSE_POSITIVE_SCORE that match no ground truth, divided by ``frames``."""
    false = (det['scores'] >= FALSE_POSITIVE_SCORE) & ~det['tp'][:, t] if len(det['scores']) else np.zeros(0, bool)
    n = max(frames, 1)
    out = {name: float((false & (det['labels'] == k)).sum() / n) for k, name in enumerate(classes)}
    out['all'] = float(false.sum() / n)
    return out


def nearest_ground_truth(boxes: np.ndarray, labels: np.ndarray, gt_boxes: np.ndarray,
                         gt_labels: np.ndarray) -> dict[str, np.ndarray]:
    """Per detection (N, 7) / (N,) against one frame's ground truth (M, 7) / (M,): the largest BEV
    IoU with a ground-truth box of its own class ('iou_same_class', (N,)) and of any other class
    ('iou_other_class', (N,)); 0 where there is none."""
    iou = bev_iou(boxes, gt_boxes) if len(boxes) and len(gt_boxes) else np.zeros((len(boxes), len(gt_boxes)))
    same = np.asarray(labels).reshape(-1, 1) == np.asarray(gt_labels).reshape(1, -1)
    return {'iou_same_class': np.where(same, iou, 0.0).max(1, initial=0.0),
            'iou_other_class': np.where(same, 0.0, iou).max(1, initial=0.0)}


def false_positive_kinds(det: dict[str, np.ndarray], t: int, classes: Sequence[str], frames: int) -> dict:
    """The false positives of :func:`false_positives_per_scan` by what they overlap, per class
    (and 'all'): {'loose', 'other_class', 'nothing_there'} per scan. 'loose' includes duplicates of
    an object already detected."""
    if not len(det['scores']):
        return {name: {'loose': 0.0, 'other_class': 0.0, 'nothing_there': 0.0} for name in (*classes, 'all')}
    false = (det['scores'] >= FALSE_POSITIVE_SCORE) & ~det['tp'][:, t]
    loose = det['iou_same_class'] >= FALSE_POSITIVE_NEAR_IOU
    other = ~loose & (det['iou_other_class'] >= FALSE_POSITIVE_NEAR_IOU)
    kinds = {'loose': loose, 'other_class': other, 'nothing_there': ~loose & ~other}
    n = max(frames, 1)
    out = {name: {kind: float((false & mask & (det['labels'] == k)).sum() / n) for kind, mask in kinds.items()}
           for k, name in enumerate(classes)}
    out['all'] = {kind: float((false & mask).sum() / n) for kind, mask in kinds.items()}
    return out


def uncertainty_quality(det: dict[str, np.ndarray], t: int) -> dict:
    """From APAccumulator.detections() with uncertainty columns as extras and IoU column ``t``."""
    tp = det['tp'][:, t] if len(det['scores']) else np.zeros(0, bool)
    result = {'iou': UNCERTAINTY_IOU, 'true_positives': int(tp.sum()), 'false_positives': int((~tp).sum()),
              'auroc': {}, 'error_spearman': {}}
    for name in (*UNCERTAINTY_FIELDS, 'ale_corner'):
        values = det.get(name, np.zeros(0))
        ok = np.isfinite(values)
        result['auroc'][name] = auroc(values[ok], ~tp[ok]) if len(values) else None
    # the reference an uncertainty has to beat to add anything: the detection score itself
    result['score_auroc'] = auroc(-det['scores'], ~tp) if len(tp) else None
    if tp.sum() >= 3:
        err2 = np.sum((det['boxes'][tp, :2] - det['matched_gt'][tp, t, :2]) ** 2, axis=1)
        for name, pred in (('ale_xy', det['ale_x'][tp] + det['ale_y'][tp]), ('epi_reg', det['epi_reg'][tp])):
            ok = np.isfinite(pred)
            rho = spearmanr(pred[ok], err2[ok]).statistic if ok.sum() >= 3 else np.nan
            result['error_spearman'][name] = None if not np.isfinite(rho) else float(rho)
    return result
