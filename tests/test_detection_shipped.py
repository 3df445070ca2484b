"""The shipped checkpoint loads against its config and finds real objects in a fresh synthetic frame."""
from pathlib import Path

import numpy as np

from coop_perception.data.synth import Scenario, ScenarioConfig
from coop_perception.detection.checkpoint import load_detector
from coop_perception.detection.model import apply_threads
from coop_perception.geometry import bev_iou, invert_pose, transform_boxes

MODELS = Path(__file__).resolve().parents[1] / 'models'


def test_shipped_detector_finds_cars():
    model = load_detector(MODELS / 'detector.pt', MODELS / 'detector.yaml')
    apply_threads(model.cfg)
    # a seed no preset uses, so the frame was never trained on
    frame = Scenario(ScenarioConfig(seed=987654, vehicles=1, frames=1)).frame(0)
    scan = next(s for s in frame.scans if s.agent_id == 1)
    det = model.detect(scan.points[:, :4])
    gt = transform_boxes(invert_pose(scan.T_world_ego @ scan.T_ego_sensor), frame.boxes)
    seen = (frame.agent_points[1] >= 30) & (np.array(frame.categories) == 'vehicle.car')
    assert seen.sum() >= 2
    cars = det.boxes[(det.labels == 0) & (det.scores >= 0.3)]
    assert len(cars) >= 1
    iou = bev_iou(cars, gt[seen])
    assert (iou.max(axis=1) >= 0.5).sum() >= 1, 'no confident car detection overlaps a real car'
    # and most confident car detections are real
    assert (iou.max(axis=1) >= 0.3).mean() >= 0.5
    assert det.uncertainty.shape == (len(det.boxes), 6) and np.isfinite(det.uncertainty).all()
