"""Collaborator ROIs decoded at the receiver are the sender's own boxes, moved into the ego frame."""
from pathlib import Path

import numpy as np
import pytest

from coop_perception.data.synth import Scenario, ScenarioConfig
from coop_perception.detection.checkpoint import load_detector
from coop_perception.detection.model import apply_threads
from coop_perception.fusion.align import warp_boxes
from coop_perception.fusion.codec import decode, encode
from coop_perception.fusion.pipeline import collaborator_message
from coop_perception.fusion.roi_boxes import decode_roi_boxes, roi_peaks
from coop_perception.geometry import make_pose

MODELS = Path(__file__).resolve().parents[1] / 'models'
MS = 1_000_000


@pytest.fixture(scope='module')
def sender():
    model = load_detector(MODELS / 'detector.pt', MODELS / 'detector.yaml')
    apply_threads(model.cfg)
    frame = Scenario(ScenarioConfig(seed=24680, vehicles=2, frames=1)).frame(0)
    scan = next(s for s in frame.scans if s.agent_id == 0)   # the road-side unit sees the most
    det = model.detect(scan.points[:, :4])
    msg = collaborator_message(det, 0, 500 * MS)
    fields, data, step = encode(msg)   # what arrives: the wire round trip
    msg = decode(fields, data, step, width=msg.num_cells, grid=det.grid, channels=msg.channels,
                 agent_id=0, stamp_ns=500 * MS)
    return model, det, msg


def _match(boxes, reference):
    """Index of the nearest reference box centre for each box."""
    d = np.linalg.norm(boxes[:, None, :2] - reference[None, :, :2], axis=-1)
    return d.argmin(1), d.min(1)


def test_one_box_per_shared_roi_equal_to_the_senders_own(sender):
    model, det, msg = sender
    I = np.eye(4)
    rb = decode_roi_boxes(model.head, msg, I, I, msg.stamp_ns, 0.0)
    rois = np.unique(msg.roi[msg.roi >= 0])
    assert len(rois) >= 5 and len(rb.boxes) == len(rois) == len(roi_peaks(msg))
    j, dist = _match(rb.boxes, det.boxes)
    # the head at the ROI's peak, on int8 features, reads what the sender's head read
    assert np.median(dist) < 0.02 and (dist < 0.1).mean() >= 0.9
    assert np.allclose(rb.boxes[:, 3:6], det.boxes[j, 3:6], rtol=0.05)
    cars = (rb.labels == 0) & (det.labels[j] == 0)
    yaw_err = np.abs((rb.boxes[cars, 6] - det.boxes[j[cars], 6] + np.pi / 2) % np.pi - np.pi / 2)
    assert cars.sum() >= 3 and np.median(yaw_err) < 0.02
    assert np.allclose(rb.scores, det.scores[j], atol=0.05)
    assert np.allclose(rb.attributes[:, 0], msg.score[roi_peaks(msg)])
    assert (rb.attributes[:, 5] == 0).all()


def test_boxes_move_with_the_relative_pose_and_the_roi_velocity(sender):
    model, det, msg = sender
    T_sender = make_pose([10.0, -4.0, 5.5], yaw=0.7)
    T_ego = make_pose([-3.0, 6.0, 1.8], yaw=-0.4)
    ego_stamp = msg.stamp_ns + 200 * MS
    I = np.eye(4)
    local = decode_roi_boxes(model.head, msg, I, I, msg.stamp_ns, 0.0)
    moved = decode_roi_boxes(model.head, msg, T_sender, T_ego, ego_stamp, 1.8)
    expected, vel = warp_boxes(local.boxes, msg.velocity[roi_peaks(msg)], T_sender, T_ego, msg.stamp_ns, ego_stamp)
    assert np.allclose(moved.boxes[:, [0, 1, 3, 4, 5, 6]], expected[:, [0, 1, 3, 4, 5, 6]], atol=1e-6)
    # z is measured from the ground below the ego, whatever the sender's height
    assert np.allclose(moved.boxes[:, 2], local.boxes[:, 2] - 1.8)
    assert np.allclose(moved.velocities, vel) and np.allclose(moved.attributes[:, 5], 0.2)
    # displacement: how far the motion compensation moved each box
    assert np.allclose(moved.attributes[:, 6], 0.2 * np.linalg.norm(msg.velocity[roi_peaks(msg)], axis=1), atol=1e-5)
    # range: from the sender that saw the box, wherever the ego is
    assert np.allclose(moved.attributes[:, 7], np.hypot(local.boxes[:, 0], local.boxes[:, 1]), atol=1e-4)
