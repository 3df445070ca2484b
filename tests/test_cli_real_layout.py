"""The real V2X-Sim layout through the command line, on its synthetic twin (`synth --mimic
v2xsim-real`): conventions named by `info`, bag stamps one frame period apart, the same detector
AP as our own layout of the same scenes, and a training smoke run."""
import json
import subprocess
import sys

import numpy as np
import pytest

from coop_perception.data.bag import BagReader

LIDAR_TOPICS = ['/agent0/lidar', '/agent1/lidar', '/agent2/lidar', '/ground_truth/objects']


def run(*args):
    return subprocess.run([sys.executable, '-m', 'coop_perception.cli', *map(str, args)],
                          capture_output=True, text=True, timeout=600)


def synth(out, *extra):
    r = run('synth', '--out', out, '--scenes', 1, '--frames', 6, '--agents', 3, '--seed', 3, '--quiet', *extra)
    assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope='module')
def real(tmp_path_factory):
    out = tmp_path_factory.mktemp('real') / 'data'
    r = synth(out, '--mimic', 'v2xsim-real')
    assert 'read it with --frame-period 0.1' in r.stdout
    return out


def _header_stamps(bag):
    stamps = {}
    with BagReader(bag) as reader:
        for topic, _, msg in reader.messages(LIDAR_TOPICS):
            stamps.setdefault(topic, []).append(msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec)
    return stamps


def test_info_names_the_conventions(real, tmp_path):
    r = run('info', real)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert 'timestamps count frames' in lines[0] and '--frame-period' in lines[0]
    r = run('info', real, '--frame-period', 0.1, '--json', tmp_path / 'info.json')
    assert r.returncode == 0, r.stderr
    for phrase in ('metadata folder: v2.0 (detected)', 'timestamps: frame counters x 0.1 s',
                   'scene order: table order (scene_9)', 'unmapped (read as other): none',
                   'width is not the point count', 'counted from the sweeps (no agent_lidar_pts)',
                   'T_world_ego @ T_ego_sensor ok', 'LiDAR profiles (agent-scans): unrecorded='):
        assert phrase in r.stdout, phrase
    assert 'conventions detected: timestamps are frame counters x 0.1 s' in r.stderr   # logged once
    info = json.loads((tmp_path / 'info.json').read_text())
    c = info['conventions']
    assert c['time'] == {'unit': 'frame', 'period_s': 0.1, 'step': 1.0}
    assert c['visibility'] == 'counted' and c['width_is_point_count'] is False
    assert c['categories']['unmapped'] == [] and set(c['categories']['classes'].values()) <= {
        'car', 'truck', 'pedestrian', 'cyclist'}


def test_bag_stamps_are_one_frame_period_apart(real, tmp_path):
    r = run('to-bag', real, '--frame-period', 0.1, '--out', tmp_path / 'bag')
    assert r.returncode == 0, r.stderr
    for topic, stamps in _header_stamps(tmp_path / 'bag').items():
        assert len(stamps) == 6 and np.all(np.diff(stamps) == 100_000_000), topic


def test_detector_ap_matches_our_layout_and_training_runs(real, tmp_path):
    own = tmp_path / 'own'
    synth(own, '--synchronous')
    ap = {}
    for name, args in (('real', ['--data', real, '--frame-period', 0.1]), ('own', ['--data', own])):
        r = run('eval', 'detector', *args, '--agents', 1, '--json', tmp_path / f'{name}.json')
        assert r.returncode == 0, r.stderr
        ap[name] = json.loads((tmp_path / f'{name}.json').read_text())
    car = {name: result['ap']['car'] for name, result in ap.items()}   # fractions, per IoU threshold
    for iou in ('0.5', '0.7'):
        assert abs(car['real'][iou] - car['own'][iou]) * 100 <= 0.5, (iou, car)
    r = run('train', 'detector', '--data', real, '--frame-period', 0.1, '--iterations', 2, '--out', tmp_path / 'x')
    assert r.returncode == 0, r.stderr
    assert (tmp_path / 'x' / 'detector.pt').exists()
