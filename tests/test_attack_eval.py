"""``eval fusion --attack``: the attacks change what the attacker sends, and the evaluation runs
every row on a tiny dataset."""
from pathlib import Path

import numpy as np
import pytest
import torch
from ros_fixtures import TINY

from coop_perception.data.v2xsim import V2XSimDataset
from coop_perception.detection.config import load_config, with_overrides
from coop_perception.detection.free_range import azimuth_bins
from coop_perception.detection.model import Detector
from coop_perception.eval import attack_eval as A
from coop_perception.eval.fusion_eval import _scene_payloads, scene_samples
from coop_perception.fusion.cache import FeatureCache, build_cache
from coop_perception.fusion.codec import FeatureMessage
from coop_perception.fusion.model import FusionModel
from coop_perception.fusion.payloads import BoxList
from coop_perception.geometry import make_pose, matrix_yaw

CFG = load_config(Path(__file__).parents[1] / 'models' / 'detector.yaml')
LOW_ROI = {'score_threshold': 0.0}


@pytest.fixture(scope='module')
def setup(tiny_dataset, tmp_path_factory):
    torch.manual_seed(0)
    det = Detector(with_overrides(CFG, **TINY)).eval()
    ds = V2XSimDataset(tiny_dataset)
    root = tmp_path_factory.mktemp('attack_cache')
    build_cache(ds, det, root, progress=False)
    return det, ds, FeatureCache(root, det.grid())


def test_lied_pose_moves_and_turns():
    T = make_pose([10, 5, 1.8], yaw=0.3)
    lied = A.lied_pose(T, 3.0, 0.0, 10.0)
    assert lied[:3, 3] == pytest.approx([13, 5, 1.8])
    assert matrix_yaw(lied) == pytest.approx(0.3 + np.deg2rad(10.0))


@pytest.mark.parametrize('kind, layout', [(FeatureMessage, 'cells'), (FeatureMessage, 'compact'), (BoxList, None)])
def test_attacks_change_only_the_attacker(setup, kind, layout):
    det, ds, cache = setup
    samples, egos = scene_samples(ds, 0)
    payloads = _scene_payloads(cache, samples, kind, {**LOW_ROI, 'format': layout or 'cells'})
    ego, attacker = egos[0], 0
    rng = np.random.default_rng(0)
    for attack in A.ATTACKS:
        out = A.attacked_payloads(payloads, cache, samples, attack, attacker, ego, rng)
        honest = [key for key in payloads if key[1] != attacker]
        assert all(out[key] is payloads[key] for key in honest), attack
        _, pose, item, _ = out[(3, attacker)]
        if attack == 'shift':
            assert np.linalg.norm(pose[:2, 3] - payloads[(3, attacker)][1][:2, 3]) == pytest.approx(A.SHIFT_M)
        if attack == 'drop':
            assert (len(item.boxes) if kind is BoxList else (item.roi >= 0).sum()) == 0
    # replay: REPLAY_FRAMES old, restamped; the tiny scene is shorter, so the attacker stays honest
    out = A.attacked_payloads(payloads, cache, samples, 'replay', attacker, ego, rng)
    assert out[(3, attacker)][2] is payloads[(3, attacker)][2]
    noisy = A.attacked_payloads(payloads, cache, samples, 'pose_noise_0.5', attacker, ego, rng)
    assert all(not np.allclose(noisy[k][1], payloads[k][1]) for k in payloads if k[1] != ego)


def _free_places(msg, n: int) -> np.ndarray:
    """``n`` places (m, cell centres) where a copy of any of the message's ROIs lands on free cells
    inside the grid: what the untrained tiny detector sends differs with the CPU's precision."""
    size = msg.grid.cell_size
    reach = max(np.ptp(msg.cells[msg.roi == r], axis=0).max() for r in np.unique(msg.roi[msg.roi >= 0]))
    margin = reach + size   # the copy's cells lie within ``reach`` of its peak
    (x0, y0), (H, W) = msg.grid.origin, msg.grid.shape
    xs = x0 + size * (np.arange(W) + 0.5)
    ys = y0 + size * (np.arange(H) + 0.5)
    grid = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)
    inner = grid[(grid[:, 0] > x0 + margin) & (grid[:, 0] < x0 + W * size - margin)
                 & (grid[:, 1] > y0 + margin) & (grid[:, 1] < y0 + H * size - margin)]
    gap = np.linalg.norm(inner[:, None] - msg.cells[None], axis=-1).min(1)
    free = inner[gap > margin]
    assert len(free) >= n
    picked = [free[0]]
    while len(picked) < n:   # far from each other too
        picked.append(free[np.argmax(np.linalg.norm(free[:, None] - np.array(picked)[None], axis=-1).min(1))])
    return np.array(picked)


@pytest.mark.parametrize('layout', ['cells', 'compact'])
def test_phantoms_are_copies_of_a_real_roi_at_free_places(setup, layout):
    det, ds, cache = setup
    samples, _ = scene_samples(ds, 0)
    payloads = _scene_payloads(cache, samples, FeatureMessage, {**LOW_ROI, 'format': layout})
    msg = payloads[(1, 0)][2]
    assert (msg.roi >= 0).any()
    places = _free_places(msg, 2)
    out = A.with_phantoms(msg, places)
    new = np.setdiff1d(np.unique(out.roi), np.unique(msg.roi))
    assert len(new) == 2 and out.num_cells > msg.num_cells
    if layout == 'compact':   # one record per object: its box moves with its peak
        template = np.argmax(msg.score)
        moved = out.boxes[msg.num_cells:, :2] - msg.boxes[template, :2]
        assert np.allclose(moved, out.cells[msg.num_cells:] - msg.cells[template], atol=1e-4)
    for r, place in zip(new, places):
        cells = out.cells[out.roi == r]
        peak = cells[np.argmax(out.confidence[out.roi == r])]
        assert np.abs(peak - place).max() <= msg.grid.cell_size / 2 + 1e-6
        assert (out.velocity[out.roi == r] == 0).all()
        # the profile it sends lies too: every phantom cell stands in front of the first return
        bins = azimuth_bins(cells[:, 0], cells[:, 1], len(out.free_range))
        assert (out.free_range[bins] < np.hypot(cells[:, 0], cells[:, 1])).all()
    assert msg.free_range is not None and (out.free_range <= msg.free_range).all()
    boxes = BoxList(np.array([[1.0, 2, 0, 4, 2, 1.5, 0]]), np.array([0.8]), np.array([0]), np.zeros((1, 2)))
    got = A.with_phantoms(boxes, places)
    assert len(got.boxes) == 3 and got.boxes[1:, :2] == pytest.approx(places)


def test_evaluation_runs_every_row(setup):
    det, ds, cache = setup
    result = A.evaluate_attacks(ds, det, cache, FusionModel(TINY['model']['feature_channels']), 'trust', 100.0,
                                list(A.ATTACKS), pose_noise=(0.2,), roi_policy=LOW_ROI, progress=False)
    names = [r['attack'] for r in result['results']]
    assert names == ['none', *A.ATTACKS, 'pose_noise_0.2']
    assert set(result['attack']) == set(A.ATTACKS)
    assert set(result['attack']['phantom']) == {'detection_rate', 'false_alarm_rate', 'ap70_gap_to_oracle'}
    # the tiny scene is shorter than the warm-up: no frame is scored for flags
    assert all(r['attacker_frames'] == 0 and r['detection_rate'] is None for r in result['results'])
    assert 'phantom' in A.format_attacks(result)


@pytest.mark.parametrize('args, message', [
    (['--attack', 'phantom,teleport'], 'unknown attack(s) teleport; choose from phantom, shift, drop, replay or all'),
    (['--attack', 'all', '--methods', 'early'], 'early: collaborators send no boxes or features'),
    (['--attack', 'shift', '--pose-noise', '0.2,-1'], 'sigmas must be > 0'),
])
def test_cli_refuses_bad_attack_options(capsys, args, message):
    from coop_perception.cli import main as cli_main

    assert cli_main(['eval', 'fusion', '--data', 'nowhere', *args]) == 2
    assert message in capsys.readouterr().err
