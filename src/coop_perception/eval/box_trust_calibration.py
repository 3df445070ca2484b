"""Calibration of the box trust (fusion.trust.BoxTrust) on validation data under delay (never on
the reported split).

Every vehicle takes the ego role in turn; every other agent's feature message from the ego's
frame and from each of the frames before it up to ``DELAY_FRAMES`` back is decoded into ROI boxes
at the ego stamp, exactly as the fusion does (``fusion.roi_boxes``, with the sender's tracked
velocities), and each box is labelled a true positive when it matches the cooperative ground
truth at IoU 0.7 (the headline AP's threshold).
"""
from __future__ import annotations

import numpy as np
from tqdm import tqdm

from ..data.ground_truth import cooperative_targets
from ..fusion.codec import FeatureMessage
from ..fusion.pipeline import CooperativeConfig
from ..fusion.roi_boxes import decode_roi_boxes
from ..fusion.trust import BoxTrust, box_trust_features
from .ap import APAccumulator, auroc
from .fusion_eval import _scene_payloads, scene_samples

CALIBRATION_IOU = 0.7
DELAY_FRAMES = 6          # messages up to this many frames old (600 ms at 10 Hz)


def collect_box_outcomes(dataset, detector, cache, max_range: float = 50.0,
                         progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """-> features (n, len(BOX_TRUST_FEATURES)) and true-positive flags (n,) of every ROI box."""
    acc = APAccumulator(detector.cfg.classes, iou_thresholds=(CALIBRATION_IOU,), max_range=max_range)
    # boxes on the ego vehicle itself are dropped by the fusion, not trusted
    half = np.asarray(CooperativeConfig().own_footprint_m) / 2
    for s in tqdm(range(len(dataset.scenes)), desc='calibrate box trust', unit='scene', disable=not progress):
        samples, egos = scene_samples(dataset, s)
        payloads = _scene_payloads(cache, samples, FeatureMessage, {})
        for ego in egos:
            for f_e, smp in enumerate(samples):
                if ego not in smp.agents:
                    continue
                view = cache.load(smp.scene_name, f_e, ego)
                truth, truth_labels, _ = cooperative_targets(smp, ego)
                for f_s in range(max(0, f_e - DELAY_FRAMES), f_e + 1):
                    for k in samples[f_s].agents:
                        if k == ego:
                            continue
                        _, pose, msg, _ = payloads[(f_s, k)]
                        rb = decode_roi_boxes(detector.head, msg, pose, view.T_world_sensor, view.stamp_ns,
                                              view.detections.sensor_height)
                        keep = ~((np.abs(rb.boxes[:, 0]) < half[0]) & (np.abs(rb.boxes[:, 1]) < half[1]))
                        acc.add_frame(rb.boxes[keep], rb.scores[keep], rb.labels[keep], truth, truth_labels,
                                      extra={'features': box_trust_features(rb.attributes)[keep]})
    d = acc.detections()
    return d['features'], d['tp'][:, 0]


def calibrate_box_trust(dataset, detector, cache, progress: bool = True) -> tuple[BoxTrust, dict]:
    """-> (box trust fitted on ``dataset``, summary: counts and AUROC of TP vs FP by trust and by
    the detection score alone)."""
    features, tp = collect_box_outcomes(dataset, detector, cache, progress=progress)
    trust = BoxTrust.fit(features, tp)
    x = (features - np.asarray(trust.mean)) / np.asarray(trust.std)
    fitted = x @ np.asarray(trust.weights) + trust.bias
    summary = {'boxes': int(len(tp)), 'true_positives': int(tp.sum()), 'iou': CALIBRATION_IOU,
               'delay_frames': DELAY_FRAMES, 'auroc_trust': auroc(fitted, tp), 'auroc_score': auroc(features[:, 0], tp)}
    return trust, summary
