"""Misbehaving collaborators: the free-range profile, consistency evidence, the reputation, and
the pipeline excluding an attacker while it keeps an honest collaborator."""
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from coop_perception.detection.config import load_config, with_overrides
from coop_perception.detection.decode import empty_detections
from coop_perception.detection.free_range import FREE_RANGE_BINS, FREE_RANGE_MAX_M, azimuth_bins, free_range_profile
from coop_perception.detection.model import Detector
from coop_perception.detection.voxelize import VoxelStats
from coop_perception.fusion.payloads import BoxList
from coop_perception.fusion.pipeline import CooperativeConfig, CooperativeDetector
from coop_perception.fusion.reputation import (Evidence, Reputation, ReputationConfig, consistency_evidence,
                                               free_space_conflicts, make_witness, matched_offset)
from coop_perception.geometry import make_pose

CFG = load_config(Path(__file__).parents[1] / 'models' / 'detector.yaml')
MS = 1_000_000
H = 1.8   # sensor height above the ground (m)


def wall(x0, y_half=3.0, n=2000, seed=0):
    """Points of a wall across +x at x0 (m), 0.2..3 m above the ground, plus ground returns."""
    rng = np.random.default_rng(seed)
    w = np.stack([np.full(n, x0), rng.uniform(-y_half, y_half, n), rng.uniform(0.2, 3.0, n) - H], 1)
    r, a = rng.uniform(2, 60, n), rng.uniform(-np.pi, np.pi, n)
    ground = np.stack([r * np.cos(a), r * np.sin(a), np.full(n, -H)], 1)
    return np.concatenate([w, ground]).astype(np.float32)


def car(x, y, yaw=0.0):
    return np.array([x, y, -1.0, 4.5, 1.9, 1.6, yaw])


def test_free_range_profile_is_the_nearest_obstacle_per_bin():
    free = free_range_profile(wall(10.0), H)
    assert free.shape == (FREE_RANGE_BINS,) and free.dtype == np.float32
    ahead = azimuth_bins(10.0, 0.0)
    assert free[ahead] == pytest.approx(10.0, abs=0.05)        # the wall, not the ground behind it
    assert free[azimuth_bins(-10.0, 0.0)] == FREE_RANGE_MAX_M  # only ground returns: free to the range
    # 2.9 m above the ground is over the obstacle band: not an obstacle
    high = np.array([[10.0, 0.0, 2.9 - H]], np.float32)
    assert free_range_profile(high, H)[ahead] == FREE_RANGE_MAX_M
    assert (free_range_profile(np.zeros((0, 3)), H) == FREE_RANGE_MAX_M).all()
    nan = np.array([[np.nan, 0.0, 0.0], [5.0, 0.0, 1.0 - H]], np.float32)
    assert free_range_profile(nan, H)[ahead] == pytest.approx(5.0)


def test_detector_output_carries_the_profile():
    torch.manual_seed(0)
    det = Detector(with_overrides(CFG, decode={'mc_passes': 0})).eval()
    out = det.detect(wall(12.0), sensor_height=H)
    assert out.free_range is not None and out.free_range[azimuth_bins(12.0, 0.0)] == pytest.approx(12.0, abs=0.05)
    assert 'free_range' in out.timings_ms
    assert det.detect(np.zeros((0, 4), np.float32)).free_range is not None


def test_box_in_seen_free_space_conflicts_and_a_real_or_hidden_one_does_not():
    cfg = ReputationConfig()
    free = np.full(FREE_RANGE_BINS, 30.0, np.float32)
    free[azimuth_bins(0.0, 15.0)] = 13.0           # something returned at 13 m towards +y
    boxes = np.stack([car(15.0, 0.0),                 # seen through (free to 30 m): a phantom
                      car(0.0, 15.5, np.pi / 2),      # its near face at ~13 m: a real object
                      car(-15.0, 0.0), car(60.0, 0.0)])
    free[azimuth_bins(-15.0, 0.0)] = 5.0              # behind an obstacle at 5 m: not checkable
    checked, conflict = free_space_conflicts(boxes, np.zeros((4, 2)), 0.0, free, cfg)
    assert checked.tolist() == [True, True, False, False]   # the last beyond check_range_m
    assert conflict.tolist() == [True, False, False, False]
    # a fast box moved over a long age gets a margin: free to 30 m no longer contradicts it at 15 m
    _, conflict = free_space_conflicts(boxes[:1], np.array([[20.0, 0.0]]), 1.0, free, cfg)
    assert not conflict.any()


def test_offset_of_matched_boxes():
    cfg = ReputationConfig()
    ego = np.stack([car(10, 5), car(-8, 12), car(20, -6), car(5, -15)])
    labels = np.zeros(4, int)
    n, offset = matched_offset(ego + [0.2, -0.1, 0, 0, 0, 0, 0], labels, ego, labels, cfg)
    assert n == 4 and offset == pytest.approx(np.hypot(0.2, 0.1))
    n, offset = matched_offset(ego + [3.0, 0, 0, 0, 0, 0, 0], labels, ego, labels, cfg)
    assert n == 4 and offset == pytest.approx(3.0)
    assert matched_offset(ego, labels + 1, ego, labels, cfg)[0] == 0      # another class never matches
    assert matched_offset(ego[:0], labels[:0], ego, labels, cfg) == (0, pytest.approx(np.nan, nan_ok=True))


def test_reputation_excludes_an_attacker_keeps_the_honest_and_forgets():
    cfg = ReputationConfig()
    rep = Reputation(cfg)
    phantom, honest = Evidence(checked=4, conflicts=2), Evidence(checked=4, matches=4, offset_m=0.3)
    shifted = Evidence(checked=3, conflicts=1, matches=3, offset_m=3.0)
    for i in range(5):
        t = (i + 1) * 100 * MS
        rep.observe('a', t, t, phantom)
        rep.observe('b', t, t, honest)
        rep.observe('c', t, t, shifted)
    assert rep.excluded('a') and rep.excluded('c') and rep.value('a') < cfg.exclude_below
    assert rep.value('b') == 1.0 and not rep.excluded('b') and rep.value('nobody') == 1.0
    assert rep.seen('a', 500 * MS) and not rep.seen('a', 600 * MS)
    assert rep.summary('a')['excluded'] and rep.summary('a')['conflicts'] == 2
    for i in range(5, 40):                            # behaving again: readmitted
        t = (i + 1) * 100 * MS
        rep.observe('a', t, t, honest)
    assert not rep.excluded('a')
    rep.forget('c')
    assert rep.summary('c') is None and rep.value('c') == 1.0
    rep.clear()
    assert rep.agents() == []


def test_consistency_evidence_leaves_out_low_scores_and_the_ego_itself():
    cfg = ReputationConfig()
    free = np.full(FREE_RANGE_BINS, 30.0, np.float32)
    boxes = np.stack([car(15, 0), car(0.3, 0.1), car(-15, 2)])
    ev = consistency_evidence(boxes, np.array([0.9, 0.9, 0.2]), np.zeros(3, int), np.zeros((3, 2)), 0.1,
                              np.zeros((0, 7)), np.zeros(0), np.zeros(0, int), free, cfg)
    assert (ev.checked, ev.conflicts, ev.matches) == (1, 1, 0)
    no_free = consistency_evidence(boxes, np.ones(3), np.zeros(3, int), np.zeros((3, 2)), 0.1,
                                   np.zeros((0, 7)), np.zeros(0), np.zeros(0, int), None, cfg)
    assert no_free.checked == 0


def _witness(free, boxes=np.zeros((0, 7)), at=(40.0, 0.0), trusted=True, ego_boxes=np.zeros((0, 7))):
    """A witness whose sensor sits at ``at`` (ego frame, same heading) with profile ``free``."""
    T = make_pose([-at[0], -at[1], 0.0], yaw=0.0)          # ego frame -> its frame
    n = len(boxes)
    return make_witness(7, boxes, np.full(n, 0.9), np.zeros(n, int), free, T, 0.05, trusted,
                        ego_boxes, np.full(len(ego_boxes), 0.9), np.zeros((len(ego_boxes), 2)), ReputationConfig())


def _judge(boxes, witnesses, ego_free=None, ego_boxes=np.zeros((0, 7))):
    n = len(boxes)
    return consistency_evidence(boxes, np.full(n, 0.9), np.zeros(n, int), np.zeros((n, 2)), 0.1, ego_boxes,
                                np.full(len(ego_boxes), 0.9), np.zeros(len(ego_boxes), int), ego_free,
                                ReputationConfig(), witnesses)


def test_a_witness_free_space_speaks_where_the_ego_cannot_see():
    phantom = car(55.0, 0.0)                         # beyond the ego's check range, 15 m before the witness
    ego_free = np.full(FREE_RANGE_BINS, 5.0, np.float32)   # the ego is walled in: it checks nothing
    seen_through = np.full(FREE_RANGE_BINS, 40.0, np.float32)
    ev = _judge(phantom[None], [_witness(seen_through)], ego_free)
    assert (ev.checked, ev.peer_checked, ev.peer_conflicts) == (0, 1, 1)
    assert ev.llr(ReputationConfig()) == pytest.approx(ReputationConfig().peer_conflict_llr)
    # a witness that saw something at the box's near face: checked, no conflict
    blocked = seen_through.copy()
    blocked[azimuth_bins(15.0, 0.0)] = 12.5
    ev = _judge(phantom[None], [_witness(blocked)], ego_free)
    assert (ev.peer_checked, ev.peer_conflicts) == (1, 0)
    # another agent reports the box too: seen by two, not invented, whatever the witness says
    other = _witness(None, boxes=car(55.5, 0.3)[None], at=(0.0, 30.0))
    ev = _judge(phantom[None], [_witness(seen_through), other], ego_free)
    assert (ev.peer_checked, ev.peer_conflicts) == (1, 0)
    # an excluded witness testifies nothing, and neither does one whose free space holds the
    # ego's own confident box (a lying or misplaced profile)
    assert _judge(phantom[None], [_witness(seen_through, trusted=False)], ego_free).peer_checked == 0
    liar = _witness(seen_through, ego_boxes=car(30.0, 0.0)[None])
    assert liar.free_range is None and _judge(phantom[None], [liar], ego_free).peer_checked == 0
    # the witness's own vehicle, reported by the judged collaborator, is not in its free space
    assert _judge(car(40.0, 0.5)[None], [_witness(seen_through)], ego_free).peer_checked == 0


def test_offset_against_witnesses_takes_the_best_agreeing_reference():
    cfg = ReputationConfig()
    real = np.stack([car(30, 5), car(42, -8), car(50, 12)])
    shifted = real + [3.0, 0, 0, 0, 0, 0, 0]
    # no ego match: a witness's matching boxes give the offset
    honest_witness = _witness(None, boxes=real)
    ev = _judge(shifted, [honest_witness])
    assert ev.matches == 3 and ev.offset_m == pytest.approx(3.0) and ev.llr(cfg) > 0
    # an agreeing reference clears it; an excluded witness is no reference
    ev = _judge(real, [_witness(None, boxes=shifted), honest_witness])
    assert ev.offset_m == pytest.approx(0.0)
    assert np.isnan(_judge(shifted, [_witness(None, boxes=real, trusted=False)]).offset_m)


@pytest.fixture(scope='module')
def detector():
    torch.manual_seed(0)
    return Detector(with_overrides(CFG, decode={'mc_passes': 0})).eval()


def _ego_frame(detector, boxes):
    """The ego's detections of ``boxes`` and the free range of a scan with returns on them."""
    det = empty_detections(detector.cfg, detector.grid(), H, VoxelStats(), {}, '')
    rng = np.random.default_rng(0)
    local = rng.uniform(-0.5, 0.5, (len(boxes), 300, 2)) * boxes[:, None, 3:5]
    c, s = np.cos(boxes[:, 6])[:, None], np.sin(boxes[:, 6])[:, None]
    xy = boxes[:, None, :2] + np.stack([c * local[..., 0] - s * local[..., 1], s * local[..., 0] + c * local[..., 1]],
                                       -1)
    points = np.concatenate([xy.reshape(-1, 2), np.full((xy.size // 2, 1), 1.0 - H)], 1)
    free = free_range_profile(points, H)
    return replace(det, boxes=boxes, scores=np.full(len(boxes), 0.9, np.float32),
                   labels=np.zeros(len(boxes), np.int64), velocities=np.zeros((len(boxes), 2), np.float32),
                   uncertainty=np.zeros((len(boxes), 6), np.float32), free_range=free)


@pytest.mark.parametrize('enabled', [True, False])
def test_pipeline_excludes_a_phantom_sender(detector, enabled):
    real = np.stack([car(10, 8), car(-12, 6), car(18, -10)])
    coop = CooperativeDetector(detector, 1, CooperativeConfig(method='late', reputation=ReputationConfig(
        enabled=enabled)))
    phantoms = np.stack([car(25, 0), car(0, -22)])
    for i in range(10):
        t = (i + 1) * 100 * MS
        coop.add_pose(1, t, make_pose([0, 0, H], yaw=0.0))
        coop.add_ego_detections(t, _ego_frame(detector, real))
        for agent, boxes in ((2, real), (3, np.concatenate([real, phantoms]))):
            # both collaborators sit at the ego's pose, so their boxes are in the ego frame as sent
            coop.add_pose(agent, t, make_pose([0, 0, H], yaw=0.0))
            coop.add_input(agent, t, BoxList(boxes, np.full(len(boxes), 0.9), np.zeros(len(boxes), int),
                                             np.zeros((len(boxes), 2))))
        out = coop.detect(t)
    near_phantom = np.linalg.norm(out.boxes[:, None, :2] - phantoms[None, :, :2], axis=2).min(0) < 1.0
    assert coop.reputation_on is enabled
    if enabled:
        assert coop.reputation.excluded(3) and not coop.reputation.excluded(2)
        assert coop.drops['low_reputation'] > 0 and not near_phantom.any()
        coop._forget(3)                              # bounded state: forgotten with the agent
        assert 3 not in coop.reputation.agents()
        coop.reset()
        assert coop.reputation.agents() == []
    else:
        assert near_phantom.all() and coop.reputation.agents() == []


def test_reputation_defaults_on_for_trust_only():
    assert ReputationConfig().on_for('trust') and not ReputationConfig().on_for('late')
    assert ReputationConfig(enabled=True).on_for('late') and not ReputationConfig(enabled=False).on_for('trust')
    with pytest.raises(ValueError):
        ReputationConfig(exclude_below=1.0)


def test_cache_keeps_the_profile_and_extends_old_views(tiny_dataset, tmp_path):
    from ros_fixtures import TINY

    from coop_perception.data.v2xsim import V2XSimDataset
    from coop_perception.fusion.cache import FeatureCache, add_free_ranges, load_view, save_view

    torch.manual_seed(0)
    det = Detector(with_overrides(CFG, **TINY)).eval()
    ds = V2XSimDataset(tiny_dataset)
    sample = ds.sample(0, 1)
    points = sample.agents[2].load_points()
    fresh = det.detect(points[:, :4])
    save_view(tmp_path / 'new.npz', fresh, sample.agents[2].T_world_sensor, 5)
    np.testing.assert_array_equal(load_view(tmp_path / 'new.npz', det.grid()).detections.free_range, fresh.free_range)
    # a view cached before the profile existed loads without one, until add_free_ranges gives it one
    cache = FeatureCache(tmp_path / 'cache', det.grid())
    old = cache.path(sample.scene_name, 1, 2)
    save_view(old, replace(fresh, free_range=None), sample.agents[2].T_world_sensor, 5)
    assert cache.load(sample.scene_name, 1, 2).detections.free_range is None
    assert add_free_ranges(ds, cache.root, progress=False) == 1          # only views that exist and lack one
    assert add_free_ranges(ds, cache.root, progress=False) == 0
    np.testing.assert_allclose(cache.load(sample.scene_name, 1, 2).detections.free_range,
                               free_range_profile(points[:, :3], fresh.sensor_height))


def test_ego_boxes_from_the_ego_maps_rois_are_its_detections(tiny_dataset):
    from coop_perception.data.v2xsim import V2XSimDataset
    from coop_perception.detection.checkpoint import load_detector
    from coop_perception.fusion.codec import make_message
    from coop_perception.fusion.ego_map import ego_features
    from coop_perception.fusion.sharing import select_occupied_cells

    models = Path(__file__).parents[1] / 'models'
    detector = load_detector(models / 'detector.pt', models / 'detector.yaml')
    det = detector.detect(V2XSimDataset(tiny_dataset).sample(0, 1).agents[1].load_points()[:, :4], mc_passes=0)
    msg = make_message(det, select_occupied_cells(det), 1, 100 * MS)
    coop = CooperativeDetector(detector, 1, CooperativeConfig(method='max'))
    coop.add_ego_map(100 * MS, ego_features(msg, detector.grid(), msg.channels), det.sensor_height, det.free_range,
                     msg)
    own = coop._own_boxes(coop._ego[100 * MS][0], make_pose([0, 0, H], yaw=0.0), 100 * MS)
    ids = np.unique(msg.roi[msg.roi >= 0])
    confident = det.scores[ids] >= 0.5
    assert confident.sum() >= 2
    # the head at each confident ROI's peak of the int8 map: the detector's own box, to quantisation error
    np.testing.assert_allclose(own.boxes[confident, :2], det.boxes[ids[confident], :2], atol=0.05)
    np.testing.assert_array_equal(own.labels[confident], det.labels[ids[confident]])


def test_each_collaborator_message_is_decoded_once_a_frame(tiny_dataset, monkeypatch):
    """The reputation and the merge both read a message's ROI boxes: decoded once per frame."""
    from coop_perception.data.v2xsim import V2XSimDataset
    from coop_perception.detection.checkpoint import load_detector
    from coop_perception.fusion import pipeline
    from coop_perception.fusion.model import FusionModel

    models = Path(__file__).parents[1] / 'models'
    detector = load_detector(models / 'detector.pt', models / 'detector.yaml')
    smp = V2XSimDataset(tiny_dataset).sample(0, 1)
    coop = CooperativeDetector(detector, 1, CooperativeConfig(method='trust', reputation=ReputationConfig(
        enabled=True)), FusionModel.load(models / 'fusion.pt'))
    decoded = []
    real = pipeline.decode_roi_boxes
    monkeypatch.setattr(pipeline, 'decode_roi_boxes', lambda *a, **kw: decoded.append(a[1].agent_id) or real(*a, **kw))
    t = 1000 * MS
    for k, agent in sorted(smp.agents.items()):
        det = detector.detect(agent.load_points()[:, :4], mc_passes=0)
        stamp = t if k == 1 else t - 50 * MS   # the collaborators' messages are 50 ms old
        coop.add_pose(k, stamp, agent.T_world_sensor)
        if k == 1:
            coop.add_ego_detections(t, det)
        else:
            coop.add_input(k, stamp, pipeline.collaborator_message(det, k, stamp))
    out = coop.detect(t)
    collaborators = sorted(k for k in smp.agents if k != 1)
    assert out is not None and len(collaborators) >= 2
    assert sorted(decoded) == collaborators
