"""Per-stage latency of the detector over a set of scans (what `bench detector` reports)."""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from .model import Detector

STAGES = ('voxelize', 'encoder', 'backbone_head', 'decode', 'mc', 'scan_velocity', 'total')


def bench_detector(model: Detector, scans: Iterable[tuple[np.ndarray, np.ndarray | None]], warmup: int = 3) -> dict:
    """Run ``model.detect`` on every scan, each (points (N, 3+), ages (N,) s or None: stacked
    sweeps as a sensor's node sees them, detection.sweeps); the first ``warmup`` runs (one-off
    allocations and kernel selection) are not counted.
    -> {'median_ms': {stage: ms}, 'p90_ms': {...}, 'scans': n}."""
    scans = list(scans)
    for pts, ages in scans[:warmup]:
        model.detect(pts, ages=ages)
    rows = [model.detect(pts, ages=ages).timings_ms for pts, ages in scans]
    # an empty scan skips the network: its missing stages count as 0 ms
    table = {s: np.array([r.get(s, 0.0) for r in rows]) for s in STAGES}
    return {'median_ms': {s: float(np.median(v)) for s, v in table.items()},
            'p90_ms': {s: float(np.percentile(v, 90)) for s, v in table.items()},
            'scans': len(rows)}
