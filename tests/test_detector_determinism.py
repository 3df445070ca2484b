"""The detector gives the same output for the same scan, however many torch threads run: spconv's
CPU submanifold convolution sums in thread-dependent order, which once made the same scan give
73 to 77 boxes."""
import numpy as np
import torch
from ros_fixtures import ROOT, valid_scan

from coop_perception.detection.checkpoint import load_detector
from coop_perception.detection.config import load_config, with_overrides


def test_same_scan_same_detections_with_several_threads():
    # the shipped detector (random weights hide it), float32 so that only the threads differ
    cfg = with_overrides(load_config(ROOT / 'models' / 'detector.yaml'), runtime={'bf16': False})
    detector = load_detector(ROOT / 'models' / 'detector.pt', cfg)
    scan = valid_scan(0, 60000)
    scan[:, :2] *= 4                                    # ground out to 48 m: tens of thousands of voxels
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        runs = [detector.detect(scan) for _ in range(6)]   # before the fix, most tries of six differed
        assert torch.get_num_threads() == 4            # the encoder gives the threads back
    finally:
        torch.set_num_threads(threads)
    first = runs[0]
    for det in runs[1:]:
        assert np.array_equal(det.features, first.features)
        assert np.array_equal(det.boxes, first.boxes) and np.array_equal(det.scores, first.scores)
        assert np.array_equal(det.uncertainty, first.uncertainty, equal_nan=True)
