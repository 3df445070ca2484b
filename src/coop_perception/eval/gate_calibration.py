"""Calibration of the threshold trust gate on validation data (never on the reported split)."""
from __future__ import annotations

import numpy as np
from tqdm import tqdm

from ..data.ground_truth import cooperative_targets
from ..data.synth import RSU_AGENT
from ..fusion.cache import FeatureCache
from ..fusion.codec import message_uncertainty
from ..fusion.trust import ThresholdTrust
from .ap import APAccumulator

CALIBRATION_IOU = 0.5


def calibrate_gate(dataset, cache: FeatureCache, classes, *, quantile: float = 0.95, min_score: float = 0.3,
                   half_life_s: float = 0.5, progress: bool = True) -> tuple[ThresholdTrust, dict]:
    """Thresholds at the `quantile` of each ROI uncertainty over true positives (IoU 0.5 against
    the cooperative ground truth) of every agent's detections with score >= min_score.
    -> (gate, summary with counts)."""
    acc = APAccumulator(classes, iou_thresholds=(CALIBRATION_IOU,))
    todo = [(s, f) for s in range(len(dataset.scenes)) for f in range(dataset.num_frames(s))]
    for s, f in tqdm(todo, desc='calibrate trust', unit='frame', disable=not progress):
        sample = dataset.sample(s, f)
        for k in sample.agents:
            det = cache.load(sample.scene_name, f, k).detections
            boxes, labels, _ = cooperative_targets(sample, k)
            keep = det.scores >= min_score
            acc.add_frame(det.boxes[keep], det.scores[keep], det.labels[keep], boxes, labels,
                          extra={'unc': message_uncertainty(det.uncertainty, det.boxes)[keep]})
    d = acc.detections()
    tp = d['tp'][:, 0]
    # age, displacement and range 0: the gate's thresholds are on the detector's own values
    attributes = np.concatenate([d['scores'][:, None], d['unc'], np.zeros((len(tp), 3))], 1)
    gate = ThresholdTrust.calibrate(attributes, tp, quantile, min_score=min_score, half_life_s=half_life_s)
    kept = gate.trust(attributes) > 0
    summary = {'true_positives': int(tp.sum()), 'false_positives': int((~tp).sum()),
               'kept_tp_fraction': float(kept[tp].mean()) if tp.any() else None,
               'kept_fp_fraction': float(kept[~tp].mean()) if (~tp).any() else None,
               'agents': 'all incl. RSU' if RSU_AGENT in dataset.agents() else 'vehicles'}
    return gate, summary
