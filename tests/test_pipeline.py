"""CooperativeDetector: input selection by stamp, drops with reasons, every fusion method."""
from pathlib import Path

import numpy as np
import pytest
import torch

from coop_perception.detection.config import load_config, with_overrides
from coop_perception.detection.model import Detector
from coop_perception.fusion.codec import FeatureMessage
from coop_perception.fusion.methods import METHODS
from coop_perception.fusion.model import FusionModel
from coop_perception.fusion.payloads import BoxList, RawPoints
from coop_perception.fusion.pipeline import CooperativeConfig, CooperativeDetector, collaborator_message
from coop_perception.geometry import make_pose

CFG = load_config(Path(__file__).parents[1] / 'models' / 'detector.yaml')
MS = 1_000_000


@pytest.fixture(scope='module')
def detector():
    torch.manual_seed(0)
    return Detector(with_overrides(CFG, decode={'score_threshold': 0.02, 'mc_passes': 2})).eval()


def scan(seed, shift=0.0):
    rng = np.random.default_rng(seed)
    n = 8000
    r, a = rng.uniform(3, 45, n), rng.uniform(-np.pi, np.pi, n)
    ground = np.stack([r * np.cos(a), r * np.sin(a), np.full(n, -1.8), np.zeros(n)], 1)
    car = np.concatenate([rng.uniform([8 + shift, -1, -1.6], [12.5 + shift, 1, -0.2], (600, 3)), np.zeros((600, 1))], 1)
    return np.concatenate([ground, car]).astype(np.float32)


def setup(detector, method, fusion=None, collaborator_stamps=(0,), roi_boxes=True):
    coop = CooperativeDetector(detector, 1, CooperativeConfig(method=method, max_age_s=0.5, gate=GATE,
                                                              roi_boxes=roi_boxes), fusion)
    T = make_pose([0, 0, 1.8], yaw=0.0)
    coop.add_pose(1, 100 * MS, T)
    coop.add_ego_scan(100 * MS, scan(1))
    other = make_pose([5, 0, 1.8], yaw=0.1)
    for stamp in collaborator_stamps:
        coop.add_pose(2, stamp * MS, other)
        pts = scan(2, shift=-5.0)
        payload = METHODS[method].payload
        if payload is FeatureMessage:
            layout = {'format': METHODS[method].sharing} if METHODS[method].sharing else {}
            coop.add_input(2, stamp * MS, collaborator_message(detector.detect(pts), 2, stamp * MS,
                                                               {'score_threshold': 0.02, **layout}))
        elif payload is BoxList:
            coop.add_input(2, stamp * MS, BoxList.from_detections(detector.detect(pts), 0.0))
        elif payload is RawPoints:
            coop.add_input(2, stamp * MS, RawPoints(pts))
    return coop


def no_boxes():
    return BoxList(np.zeros((0, 7)), np.zeros(0), np.zeros(0, int), np.zeros((0, 2)))


GATE = {'min_score': 0.0, 'thresholds': {'reg_aleatoric': 1e6}, 'half_life_s': 0.5}


@pytest.mark.parametrize('method', list(METHODS))
def test_every_method_produces_ego_frame_detections(detector, method):
    fusion = FusionModel(CFG.model.feature_channels) if METHODS[method].needs_fusion_model else None
    coop = setup(detector, method, fusion, collaborator_stamps=(0, 60))
    out = coop.detect(100 * MS)
    assert out is not None and out.stamp_ns == 100 * MS
    assert out.boxes.shape[1] == 7 and len(out.boxes) == len(out.scores) == len(out.trust) == len(out.sources)
    if method != 'ego':
        assert out.ages_s == {2: pytest.approx(0.04)}   # the newest input not newer than the ego frame
    if method in ('max', 'gate', 'trust_flat'):
        assert out.trust.max() > 0                      # collaborator cells contribute (2^-0.08 for the gate)
    assert not coop.drops


def test_untrained_trust_fusion_equals_ego_only(detector):
    # the fusion projection starts at zero: an untrained model must not change the ego's result
    ego = setup(detector, 'ego').detect(100 * MS)
    fusion = FusionModel(CFG.model.feature_channels)
    trust = setup(detector, 'trust', fusion, roi_boxes=False).detect(100 * MS)
    assert np.allclose(ego.boxes, trust.boxes) and np.allclose(ego.scores, trust.scores)
    # the collaborator's ROI boxes join in, scaled by their trust, where they beat the ego's
    merged = setup(detector, 'trust', fusion).detect(100 * MS)
    from_collaborator = (merged.sources & (1 << 2)) > 0
    assert from_collaborator.any()
    assert ((merged.trust[from_collaborator] > 0) & (merged.trust[from_collaborator] <= 1)).all()
    assert (merged.scores[from_collaborator] <= merged.trust[from_collaborator]).all()


def test_stale_future_and_poseless_inputs_are_dropped_and_counted(detector):
    coop = setup(detector, 'late', collaborator_stamps=(-900,))      # 1 s old > max_age
    coop.add_input(3, 150 * MS, no_boxes())    # future, and no pose for agent 3
    coop.add_input(4, 90 * MS, no_boxes())     # agent 4 never sent a pose
    out = coop.detect(100 * MS)
    assert out is not None and out.ages_s == {}
    assert coop.drops['stale'] == 1 and coop.drops['future'] == 1 and coop.drops['no_pose'] == 1
    assert coop.detect(123 * MS) is None and coop.drops['no_ego_frame'] == 1


def test_wrong_input_kind_is_dropped(detector):
    coop = setup(detector, 'max')
    coop.add_pose(3, 80 * MS, make_pose([0, 5, 1.8]))
    coop.add_input(3, 80 * MS, RawPoints(scan(3)))   # raw points where a feature message is expected
    coop.add_input(3, 80 * MS, scan(3))              # an untyped array
    out = coop.detect(100 * MS)
    assert out is not None and 3 not in out.ages_s
    assert coop.drops['wrong_input_kind'] == 2


def test_compact_records_to_a_method_that_fuses_cells_are_dropped(detector):
    coop = setup(detector, 'max', collaborator_stamps=())
    coop.add_pose(3, 80 * MS, make_pose([0, 5, 1.8]))
    records = collaborator_message(detector.detect(scan(3)), 3, 80 * MS, {'score_threshold': 0.02, 'format': 'compact'})
    coop.add_input(3, 80 * MS, records)
    out = coop.detect(100 * MS)
    assert out is not None and 3 not in out.ages_s and coop.drops['needs_cells'] == 1


def test_reset_forgets_everything(detector):
    coop = setup(detector, 'late')
    coop.reset()
    assert coop.detect(100 * MS) is None


def test_unknown_method_and_missing_model():
    with pytest.raises(ValueError, match='unknown fusion method'):
        CooperativeConfig(method='magic')
    with pytest.raises(ValueError, match='trained fusion model'):
        CooperativeDetector(None, 1, CooperativeConfig(method='trust'))


@pytest.mark.parametrize('footprint', [(5.0, 2.4), None])
def test_a_collaborators_box_of_the_ego_vehicle_itself_is_dropped(detector, footprint):
    coop = CooperativeDetector(detector, 1, CooperativeConfig(method='late', own_footprint_m=footprint))
    coop.add_pose(1, 100 * MS, make_pose([10.0, 5.0, 1.8], yaw=0.5))
    coop.add_ego_detections(100 * MS, detector.detect(scan(1)))
    coop.add_pose(2, 100 * MS, make_pose([0.0, 0.0, 1.8]))
    ego_in_2 = [10.3, 5.1, -1.0, 4.6, 1.9, 1.6, 0.5]       # the ego car, seen by agent 2
    other = [30.0, 5.0, -1.0, 4.6, 1.9, 1.6, 0.0]
    coop.add_input(2, 100 * MS, BoxList(np.array([ego_in_2, other]), np.array([0.9, 0.8]), np.array([0, 0]),
                                        np.zeros((2, 2))))
    out = coop.detect(100 * MS)
    from_2 = out.boxes[(out.sources & (1 << 2)) > 0]
    near_ego = np.hypot(from_2[:, 0], from_2[:, 1]) < 1.0
    assert near_ego.sum() == (0 if footprint else 1)
    assert (np.hypot(from_2[:, 0], from_2[:, 1]) > 15).sum() == 1   # the other car stays


@pytest.mark.parametrize('method', ['ego', 'trust'])
def test_an_ego_map_without_boxes_fuses_like_the_ego_detections(detector, method):
    det = detector.detect(scan(1))
    fusion = FusionModel(CFG.model.feature_channels) if method == 'trust' else None
    outs = []
    for as_map in (False, True):
        coop = CooperativeDetector(detector, 1, CooperativeConfig(method=method, max_age_s=0.5), fusion)
        coop.add_pose(1, 100 * MS, make_pose([0, 0, 1.8]))
        coop.add_pose(2, 80 * MS, make_pose([5, 0, 1.8], yaw=0.1))
        coop.add_input(2, 80 * MS, collaborator_message(detector.detect(scan(2, shift=-5.0)), 2, 80 * MS,
                                                        {'score_threshold': 0.02}))
        if as_map:
            coop.add_ego_map(100 * MS, det.features, det.sensor_height)
        else:
            coop.add_ego_detections(100 * MS, detector.detect_from_features(det.features, det.sensor_height,
                                                                            mc_passes=0))
        outs.append(coop.detect(100 * MS))
    assert len(outs[0].boxes) > 0
    assert np.allclose(outs[0].boxes, outs[1].boxes) and np.allclose(outs[0].scores, outs[1].scores)


def test_box_choice_takes_or_averages_the_geometry_of_the_least_uncertain_boxes():
    from coop_perception.fusion.pipeline import _cluster_geometry, _cluster_nms
    car = [10.0, 0.0, -1.0, 4.5, 1.9, 1.6, 0.0]
    boxes = np.array([car, [10.3, 0.1, -1.0, 4.5, 1.9, 1.6, 0.05], [30.0, 0.0, -1.0, 4.5, 1.9, 1.6, 0.0],
                      [12.5, 0.0, -1.0, 4.5, 1.9, 1.6, 0.0]])   # a neighbour, inside the NMS cluster
    scores, labels = np.array([0.9, 0.6, 0.5, 0.4]), np.zeros(4, np.int64)
    keep, clusters, overlaps = _cluster_nms(boxes, scores, labels, 0.2)
    assert list(keep) == [0, 2]                     # the highest score leads its cluster
    assert [sorted(c) for c in clusters] == [[0, 1, 3], [2]]
    variance = np.array([0.5, 0.1, np.nan, 0.1])
    geometry, ref = _cluster_geometry(boxes, scores, variance, clusters, overlaps, None)
    assert list(ref) == [1, 2] and np.allclose(geometry, boxes[[1, 2]])   # the better-placed box
    geometry, ref = _cluster_geometry(boxes, scores, variance, clusters, overlaps, 0.5)
    w = np.array([0.9 / 0.5, 0.6 / 0.1])          # score / variance; the neighbour stays out
    assert np.allclose(geometry[0, :2], (w @ boxes[:2, :2]) / w.sum())
    assert np.isclose(geometry[0, 6], (w @ boxes[:2, 6]) / w.sum())
    flipped = boxes.copy()
    flipped[1, 6] += np.pi                          # the same heading read the other way round
    yaw = _cluster_geometry(flipped, scores, variance, clusters, overlaps, 0.5)[0][0, 6]
    assert np.isclose(yaw, geometry[0, 6] + np.pi)  # the reference's direction, the same axis
    geometry, ref = _cluster_geometry(boxes, scores, np.full(4, np.nan), clusters, overlaps, None)
    assert list(ref) == [0, 2]                      # no variances: plain NMS
    geometry, _ = _cluster_geometry(boxes, np.zeros(4), variance, clusters, overlaps, 0.5)
    assert np.allclose(geometry, boxes[[1, 2]])     # every weight 0: the reference, never NaN
    # at a threshold of 1 (the choice oracle's NMS) every box is its own cluster, itself first
    keep, clusters, _ = _cluster_nms(boxes, scores, labels, 1.0)
    assert sorted(keep) == [0, 1, 2, 3] and all(list(c) == [k] for k, c in zip(keep, clusters))


def _late_with_collaborators(detector, agents, ego=1):
    coop = CooperativeDetector(detector, ego, CooperativeConfig(method='late', max_age_s=0.5, own_footprint_m=None))
    coop.add_pose(ego, 100 * MS, make_pose([0, 0, 1.8]))
    coop.add_ego_detections(100 * MS, detector.detect(scan(1)))
    for i, agent in enumerate(agents):
        coop.add_pose(agent, 90 * MS, make_pose([0, 0, 1.8]))
        box = [20.0, -40.0 + 10.0 * (i % 9), -1.0, 4.5, 1.9, 1.6, 0.0]
        coop.add_input(agent, 90 * MS, BoxList(np.array([box]), np.array([0.9 - 1e-3 * i]), np.array([0]),
                                               np.zeros((1, 2))))
    return coop


def test_any_agent_id_the_nodes_accept_is_a_source():
    from coop_perception.fusion.pipeline import SOURCE_BITS, source_bits
    bits = source_bits((1, 70, 2, 2**31 - 1, 'rsu', 62))
    assert bits[1] == 1 and bits[2] == 2 and bits[62] == 62         # small ids keep bit k = agent k
    assert len(set(bits.values())) == 6 and all(0 <= b < SOURCE_BITS for b in bits.values())


def test_agent_ids_beyond_the_int64_bit_mask_fuse_and_name_their_boxes(detector):
    agents = [63, 1023, 2**31 - 1]
    coop = _late_with_collaborators(detector, agents)
    out = coop.detect(100 * MS)                     # an OverflowError before sources had slots
    assert out is not None and set(out.ages_s) == set(agents) and not coop.drops
    objects = out.to_objects()
    for agent in agents:
        mine = out.contributed(agent)
        assert mine.sum() == 1 and objects['source'][mine].tolist() == [agent]
        assert out.contributors(int(np.flatnonzero(mine)[0])) == [agent]
    assert not out.contributed(5).any() and not out.contributed(2**70).any()


def test_more_collaborators_than_source_bits_keep_the_newest_and_count_the_rest(detector):
    from coop_perception.fusion.pipeline import MAX_COLLABORATORS
    coop = _late_with_collaborators(detector, list(range(2, MAX_COLLABORATORS + 2)))
    coop.add_pose(500, 95 * MS, make_pose([0, 0, 1.8]))
    coop.add_input(500, 95 * MS, no_boxes())            # the newest input: always fused
    out = coop.detect(100 * MS)
    assert len(out.ages_s) == MAX_COLLABORATORS and 500 in out.ages_s
    assert coop.drops['too_many_collaborators'] == 1


# --------------------------------------------------------------------------- bounded state and faults
S = 1_000_000_000


@pytest.fixture(scope='module')
def ego_det(detector):
    return detector.detect(scan(1))


def _late(ego_det, **cfg):
    """Late fusion of ego 1 whose frames are ``ego_det``; ``frame(t)`` adds pose and frame at t (ns)."""
    coop = CooperativeDetector(None, 1, CooperativeConfig(method='late', **cfg))

    def frame(t, pose=True):
        if pose:
            coop.add_pose(1, t, make_pose([t / S, 0, 1.8]))
        return coop.add_ego_detections(t, ego_det)
    return coop, frame


def _speak(coop, agent, t):
    coop.add_pose(agent, t, make_pose([5, 0, 1.8]))
    coop.add_input(agent, t, no_boxes())


def test_silent_collaborators_are_forgotten_and_new_ones_beyond_the_cap_evict_the_longest_silent(ego_det):
    coop, frame = _late(ego_det, forget_after_s=2.0, max_agents=4)
    for i in range(60):                       # 6 s at 10 Hz; agent 2 always speaks, 100+ once a second
        t = 10 * S + i * S // 10
        _speak(coop, 2, t)
        if i % 10 == 0 and i < 30:
            _speak(coop, 100 + i, t)
        frame(t)
        assert len(coop.tracked_agents()) <= 4 and len(coop.poses) <= 5 and len(coop._inputs) <= 4
    assert coop.tracked_agents() == [2] and sorted(map(str, coop.poses.agents())) == ['1', '2']
    assert coop.drops['agent_evicted'] == 0 and coop.forgotten == 3
    assert coop.detect(t).ages_s == {2: 0.0}
    for k in range(200, 210):                 # a burst of new ids in one frame: they evict their own kind
        _speak(coop, k, t)
    assert 2 in coop.tracked_agents() and len(coop.tracked_agents()) == 4
    assert coop.drops['agent_evicted'] == 7
    for i in range(1, 91):                    # silent for 9 s (forgotten), then back: used again
        frame(t + i * S // 10)
    assert coop.tracked_agents() == [] and 2 not in coop.poses
    _speak(coop, 2, t + 9 * S)
    frame(t + 91 * S // 10)
    assert coop.detect(t + 91 * S // 10).ages_s == {2: 0.1} and coop.tracked_agents() == [2]


def test_one_stale_ego_message_is_dropped_and_a_consistent_restart_empties_the_buffers(ego_det):
    coop, frame = _late(ego_det, time_jump_back_s=0.5, time_jump_confirm=3)
    for i in range(5):
        t = 50 * S + i * S // 10
        _speak(coop, 2, t)
        assert frame(t)
    coop.add_pose(1, 2 * S, make_pose([0, 0, 1.8]))         # one stale odometry message
    assert not frame(3 * S, pose=False)                      # one stale ego map
    assert not frame(10 * S, pose=False)                     # another, not consistent with the first
    assert coop.drops['stale_ego_stamp'] == 3 and coop.resets == 0
    t += S // 10
    _speak(coop, 2, t)
    assert frame(t) and coop.detect(t).ages_s == {2: 0.0}
    assert len(coop.poses[1]) == 6 and len(coop.poses[2]) == 6
    # The bag loops: the ego's own stream restarts and stays back for time_jump_confirm frames.
    _speak(coop, 2, t)                                       # in flight from the previous loop
    assert [frame(S + i * S // 10) for i in range(3)] == [False, False, True]
    assert coop.resets == 1 and coop.tracked_agents() == [] and coop.ego_time_ns == S + S // 5
    for i in range(3):                                       # every frame of the new loop is there
        out = coop.detect(S + i * S // 10)
        assert out is not None and out.ages_s == {}
    assert coop.poses[1].stamps_ns.tolist() == [S, S + S // 10, S + S // 5]
    assert 'ego_pose_unknown' not in coop.drops


def test_restart_time_keeps_the_ego_messages_of_the_new_time(ego_det):
    coop, frame = _late(ego_det)
    frame(50 * S)
    _speak(coop, 2, 50 * S)
    assert not frame(S)                                      # /clock goes back right after this map
    coop.restart_time()
    assert coop.resets == 1 and coop.tracked_agents() == [] and coop.ego_time_ns == S
    assert coop.detect(S).ages_s == {} and 'ego_pose_unknown' not in coop.drops


def test_an_unknown_ego_pose_gives_the_ego_detections_and_collaborators_return_with_it(ego_det):
    coop, frame = _late(ego_det, max_age_s=0.5)
    outputs = []
    for i in range(150):                                     # odometry stops for 10 s after 2 s
        t = 50 * S + i * S // 10
        _speak(coop, 2, t)
        frame(t, pose=not 20 <= i < 120)
        outputs.append(coop.detect(t))
    assert all(out is not None for out in outputs)
    assert all(out.ages_s == {2: 0.0} for out in outputs[:20] + outputs[121:])
    assert all(out.ages_s == {} and (out.trust == 0).all() for out in outputs[22:120])
    assert np.allclose(outputs[50].boxes, outputs[0].boxes)  # the ego's own detections
    assert coop.drops['ego_pose_unknown'] >= 98


def test_duplicated_and_reordered_inputs_are_counted_and_the_newest_used(ego_det):
    coop, frame = _late(ego_det)
    for t in (50 * S, 50 * S - S // 10, 50 * S - S // 5):    # arriving newest first
        _speak(coop, 2, t)
    coop.add_input(2, 50 * S, no_boxes())                    # a duplicate
    frame(50 * S)
    assert coop.detect(50 * S).ages_s == {2: 0.0}
    assert coop.drops['duplicate_input'] == 1 and len(coop._inputs[2]) == 3
    # a diagnosis oracle that rewrote an input puts it in its place
    rewritten = no_boxes()
    coop.add_input(2, 50 * S, rewritten, replace=True)
    assert coop.drops['duplicate_input'] == 1 and coop._inputs[2][50 * S] is rewritten


def test_state_limits_are_checked():
    with pytest.raises(ValueError, match='max_agents'):
        CooperativeConfig(max_agents=0)
    with pytest.raises(ValueError, match='forget_after_s'):
        CooperativeConfig(forget_after_s=0.0)
