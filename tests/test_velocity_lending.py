"""Velocity lending at the receiver (fusion.velocity_lending) and its use in the pipeline."""
import numpy as np
import pytest

from coop_perception.fusion.velocity_lending import LendingConfig, lend_velocities

CFG = LendingConfig()


def _lend(rows, cfg=CFG):
    """rows: (x, y, vx, vy, velocity std, label, score, age, source) -> donor index per row; the
    ego is source 0, which never borrows."""
    a = np.array(rows, np.float64)
    return lend_velocities(a[:, :2], a[:, 2:4], a[:, 4], a[:, 5].astype(int), a[:, 6], a[:, 7], a[:, 8].astype(int),
                           a[:, 8] > 0, cfg)


EGO_CAR = (13.0, 0.0, 10.0, 0.0, 0.3, 0, 0.9, 0.0, 0)     # at 13 m now, 10 m/s along x, a settled track
UNKNOWN = 10.0                                            # a tracker's first unmeasured sighting


def test_a_standing_report_borrows_the_velocity_of_the_same_object_run_back_to_its_stamp():
    # The ego sees a car at x = 13 m moving +10 m/s; a collaborator saw it 0.3 s ago at x = 10 m
    # for the first time and reported 0. The ego's car, run back 0.3 s, is where it was seen.
    out = _lend([EGO_CAR, (10.0, 0.1, 0.0, 0.0, UNKNOWN, 0, 0.8, 0.3, 1)])
    assert out.tolist() == [-1, 0]


def test_a_standing_object_its_sender_knows_borrows_nothing():
    # The same geometry, but the sender has tracked the object for a while: its 0 is an estimate.
    out = _lend([EGO_CAR, (10.0, 0.1, 0.0, 0.0, 0.2, 0, 0.8, 0.3, 1)])
    assert out.tolist() == [-1, -1]


def test_a_parked_object_beside_a_moving_one_borrows_nothing():
    # The moving car is beside the parked one now, but was 3 m behind it at the collaborator's
    # stamp: matched in time, they are different objects.
    out = _lend([(10.0, 0.5, 10.0, 0.0, 0.3, 0, 0.9, 0.0, 0), (10.0, 0.0, 0.0, 0.0, UNKNOWN, 0, 0.8, 0.3, 1)])
    assert out.tolist() == [-1, -1]


@pytest.mark.parametrize('change, why', [
    ({5: 1}, 'another class'),
    ({8: 1}, 'the same source'),
    ({6: 0.1}, 'a donor below min_score'),
    ({4: 2.0}, 'an unsettled donor track (above lend_std)'),
    ({4: np.nan}, 'a donor of unknown velocity error'),
    ({2: 0.5}, 'a donor slower than min_speed (a parked track jitters)'),
])
def test_no_lending_from(change, why):
    donor = list(EGO_CAR)
    if 2 in change:   # slow donor: keep it where the borrower's stamp puts it
        donor[0] = 10.0 + change[2] * 0.3
    for k, v in change.items():
        donor[k] = v
    out = _lend([donor, (10.0, 0.0, 0.0, 0.0, UNKNOWN, 0, 0.8, 0.3, 1)])
    assert out[1] == -1, why


def test_the_nearest_donor_wins_and_only_borrowers_borrow():
    out = _lend([EGO_CAR,                                                # run back: 10.0, 0.0
                 (13.5, 1.0, 10.0, 0.0, 0.3, 0, 0.9, 0.3, 2),               # run back: 10.5, 1.0
                 (10.2, 0.0, 0.0, 0.0, UNKNOWN, 0, 0.8, 0.3, 1),
                 (10.2, 0.0, 0.0, 0.0, UNKNOWN, 0, 0.8, 0.3, 0)])            # the ego's own: never
    assert out.tolist() == [-1, -1, 0, -1]


def test_a_fresh_input_borrows_nothing_it_would_barely_move():
    out = _lend([EGO_CAR, (12.98, 0.0, 0.0, 0.0, UNKNOWN, 0, 0.8, 0.002, 1)])
    assert out[1] == -1


def test_empty_inputs_and_bad_settings():
    assert _lend([(0, 0, 0, 0, UNKNOWN, 0, 0.9, 0.1, 1)]).tolist() == [-1]
    e = np.zeros((0, 2))
    assert lend_velocities(e, e, np.zeros(0), np.zeros(0, int), np.zeros(0), np.zeros(0), np.zeros(0, int),
                           np.zeros(0, bool), CFG).shape == (0,)
    with pytest.raises(ValueError, match='gate_m'):
        LendingConfig(gate_m=0.0)


# ------------------------------------------------------------------ in the pipeline
def _ego_detections(boxes, velocities, velocity_std):
    from coop_perception.bev_grid import BevGrid
    from coop_perception.detection.decode import Detections

    grid = BevGrid((-51.2, -51.2), 0.8, (128, 128))
    n = len(boxes)
    return Detections(np.asarray(boxes, np.float64), np.full(n, 0.9, np.float32), np.zeros(n, np.int64),
                      np.asarray(velocities, np.float32), np.full((n, 6), 0.01, np.float32),
                      np.zeros((1, 128, 128), np.float32), np.zeros((128, 128), np.float32), grid, 1.8,
                      velocity_std=np.asarray(velocity_std, np.float32))


@pytest.mark.parametrize('enabled', [True, False])
def test_late_fusion_moves_a_first_sighting_with_the_egos_track(enabled):
    from coop_perception.fusion.payloads import BoxList
    from coop_perception.fusion.pipeline import CooperativeConfig, CooperativeDetector
    from coop_perception.geometry import make_pose

    ms = 1_000_000
    coop = CooperativeDetector(None, 1, CooperativeConfig(method='late', lending=LendingConfig(enabled=enabled)))
    coop.add_pose(1, 400 * ms, make_pose([0.0, 0.0, 1.8]))
    car_now = [24.5, 4.0, -1.0, 4.6, 1.9, 1.6, 0.0]                 # moving +15 m/s along x
    coop.add_ego_detections(400 * ms, _ego_detections([car_now], [[15.0, 0.0]], [0.3]))
    # agent 2, turned by 90 degrees, saw the car 0.3 s earlier (4.5 m behind) for the first time
    coop.add_pose(2, 100 * ms, make_pose([20.0, -6.0, 1.8], yaw=np.pi / 2))
    seen = [10.0, 0.0, -1.0, 4.6, 1.9, 1.6, -np.pi / 2]           # x = 20, y = 4 in the ego frame
    coop.add_input(2, 100 * ms, BoxList(np.array([seen]), np.array([0.8]), np.array([0]), np.zeros((1, 2)),
                                        np.array([10.0], np.float32)))
    out = coop.detect(400 * ms)
    if enabled:
        assert coop.velocities_lent == 1 and len(out.boxes) == 1       # one car, where the ego sees it
        np.testing.assert_allclose(out.boxes[0, :2], car_now[:2], atol=1e-6)
    else:
        assert coop.velocities_lent == 0 and len(out.boxes) == 2       # the collaborator's left behind
        assert np.hypot(*(out.boxes[:, :2] - [20.0, 4.0]).T).min() < 1e-6


def test_a_feature_messages_roi_box_and_cells_move_with_a_lent_velocity():
    from dataclasses import replace
    from pathlib import Path

    import torch

    from coop_perception.detection.config import load_config, with_overrides
    from coop_perception.detection.model import Detector
    from coop_perception.fusion.model import FusionModel
    from coop_perception.fusion.pipeline import CooperativeConfig, CooperativeDetector, collaborator_message
    from coop_perception.fusion.roi_boxes import decode_roi_boxes
    from coop_perception.geometry import make_pose

    ms = 1_000_000
    torch.manual_seed(0)
    cfg = load_config(Path(__file__).parents[1] / 'models' / 'detector.yaml')
    detector = Detector(with_overrides(cfg, decode={'score_threshold': 0.02, 'mc_passes': 0})).eval()
    rng = np.random.default_rng(0)
    r, a = rng.uniform(3, 45, 8000), rng.uniform(-np.pi, np.pi, 8000)
    ground = np.stack([r * np.cos(a), r * np.sin(a), np.full(8000, -1.8), np.zeros(8000)], 1)
    car = np.concatenate([rng.uniform([3, -1, -1.6], [7.5, 1, -0.2], (600, 3)), np.zeros((600, 1))], 1)
    seen = detector.detect(np.concatenate([ground, car]).astype(np.float32))
    # the collaborator knows none of its velocities (first sightings)
    seen = replace(seen, velocities=np.zeros_like(seen.velocities),
                   velocity_std=np.full(len(seen.boxes), 10.0, np.float32))
    msg = collaborator_message(seen, 2, 100 * ms, {'score_threshold': 0.02})
    T_ego, T_2 = make_pose([0.0, 0.0, 1.8]), make_pose([5.0, 0.0, 1.8], yaw=0.1)
    before = decode_roi_boxes(detector.head, msg, T_2, T_ego, 400 * ms, 1.8)
    k = int(np.argmax(before.scores))
    v = np.array([8.0, 2.0])
    # the ego tracks the same object, now 0.3 s further along its velocity
    ego = detector.detect(ground.astype(np.float32))
    donor = before.boxes[k:k + 1].copy()
    donor[:, :2] += v * 0.3
    ego = replace(ego, boxes=donor, scores=np.array([0.9], np.float32), labels=before.labels[k:k + 1],
                  velocities=v[None].astype(np.float32), uncertainty=np.full((1, 6), 0.01, np.float32),
                  velocity_std=np.array([0.3], np.float32))
    coop = CooperativeDetector(detector, 1, CooperativeConfig(method='trust_flat',
                                                              lending=LendingConfig(min_score=0.0)),
                               FusionModel(cfg.model.feature_channels))
    coop.add_pose(1, 400 * ms, T_ego)
    coop.add_ego_detections(400 * ms, ego)
    coop.add_pose(2, 100 * ms, T_2)
    coop.add_input(2, 100 * ms, msg)
    assert coop.detect(400 * ms) is not None
    after = coop._frame_roi_boxes[(2, 100 * ms)]
    assert coop.velocities_lent >= 1
    np.testing.assert_allclose(after.boxes[k, :2], donor[0, :2], atol=1e-4)
    np.testing.assert_allclose(after.velocities[k], v, atol=1e-4)
    assert after.velocity_std[k] == pytest.approx(0.3)
