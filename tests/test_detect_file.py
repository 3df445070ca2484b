"""`coop-perception detect FILE...`: one synthetic scan written in every format a user may have
(.bin of 4 and 5 columns, .npy, .pcd, .ply, a rosbag2 topic) gives the same boxes; bad files give
one `error: <file>: <problem>` line and exit code 2, and the other inputs are still detected."""
import json
import subprocess
import sys

import numpy as np
import pytest

from coop_perception import cli
from coop_perception.detection.decode import UNCERTAINTY_FIELDS

BOX_KEYS = ('x', 'y', 'z', 'l', 'w', 'h', 'yaw')
TOPIC = '/agent1/lidar'
NAN_ROWS = 7


@pytest.fixture(scope='module')
def scan():
    """(N, 5) float32 [x, y, z, intensity, ring] of a vehicle's synthetic 32-beam scan."""
    from coop_perception.data.synth import Scenario, ScenarioConfig

    frame = next(Scenario(ScenarioConfig(seed=5, vehicles=1, frames=1)).frames())
    return next(s.points for s in frame.scans if s.agent_id == 1)


def write_bag(path, points, topics=(TOPIC,), messages=2):
    from coop_perception.data import ros_msgs
    from coop_perception.data.bag import LIDAR_DTYPE, POINTCLOUD2, SENSOR_QOS, BagWriter

    with BagWriter(path, 'mcap') as bag:
        for i in range(messages):
            t_ns = 1_000_000_000 + i * 100_000_000
            header = ros_msgs.make_header(bag.msgs, t_ns, 'agent1/lidar')
            for topic in topics:
                bag.write(topic, POINTCLOUD2, SENSOR_QOS, t_ns,
                          ros_msgs.points_to_cloud(points, LIDAR_DTYPE, header, bag.msgs))


@pytest.fixture(scope='module')
def inputs(scan, tmp_path_factory):
    """The scan in every format; the nuScenes .bin has NaN rows (dropped returns) inserted."""
    import open3d as o3d

    d = tmp_path_factory.mktemp('inputs')
    with_nan = np.insert(scan, np.linspace(0, len(scan), NAN_ROWS).astype(int), np.nan, axis=0)
    with_nan.astype(np.float32).tofile(d / 'nusc.pcd.bin')
    scan[:, :4].tofile(d / 'kitti.bin')
    np.save(d / 'cloud.npy', scan[:, :4].astype(np.float64))
    cloud = o3d.t.geometry.PointCloud(o3d.core.Tensor(scan[:, :3]))
    cloud.point.intensity = o3d.core.Tensor(scan[:, 3:4])
    o3d.t.io.write_point_cloud(str(d / 'cloud.pcd'), cloud)   # same stem as cloud.npy: written as cloud_2
    o3d.t.io.write_point_cloud(str(d / 'mesh.ply'), cloud)
    write_bag(d / 'rec', scan)
    return d


@pytest.fixture(scope='module')
def detected(inputs, tmp_path_factory):
    """Every input detected in one run: (exit code, output folder)."""
    out = tmp_path_factory.mktemp('detect_out')
    files = ['nusc.pcd.bin', 'kitti.bin', 'cloud.npy', 'cloud.pcd', 'mesh.ply', 'rec']
    code = cli.main(['detect', *(str(inputs / f) for f in files), '--out', str(out), '--topic', TOPIC])
    return code, out


def boxes_of(result):
    return np.array([[b[k] for k in BOX_KEYS] for b in result['boxes']]).reshape(-1, 7)


def test_every_format_gives_the_same_boxes(detected):
    code, out = detected
    assert code == 0
    names = ['nusc', 'kitti', 'cloud', 'cloud_2', 'mesh', 'rec_00000', 'rec_00001']
    results = {n: json.loads((out / f'{n}.json').read_text()) for n in names}
    assert sorted(p.stem for p in out.glob('*.png')) == sorted(names)
    ref = results['kitti']
    assert len(ref['boxes']) >= 1, 'the synthetic scan shows vehicles'
    for name, r in results.items():
        assert r['frame'] == 'sensor' and r['sensor_height_source'] == 'estimated', name
        assert r['sensor_height_m'] == pytest.approx(ref['sensor_height_m'], abs=1e-6), name
        np.testing.assert_allclose(boxes_of(r), boxes_of(ref), atol=1e-4, err_msg=name)
        assert [b['label'] for b in r['boxes']] == [b['label'] for b in ref['boxes']], name
        assert all(b['score'] >= 0.3 for b in r['boxes'])
    box = ref['boxes'][0]
    assert set(box) == {'label', 'score', *BOX_KEYS, 'vx', 'vy', 'uncertainty'}
    assert set(box['uncertainty']) == set(UNCERTAINTY_FIELDS)
    assert 1.0 < ref['sensor_height_m'] < 3.0
    assert results['nusc']['points'] == results['kitti']['points'] + NAN_ROWS
    assert results['nusc']['points_dropped']['nonfinite'] == NAN_ROWS
    assert 'non-finite' in results['nusc']['note']
    assert results['mesh']['has_intensity'] and results['cloud_2']['has_intensity']
    assert [results[f'rec_0000{i}']['stamp_ns'] for i in (0, 1)] == [1_000_000_000, 1_100_000_000]
    assert results['rec_00000']['topic'] == TOPIC and results['kitti']['stamp_ns'] is None


def test_ground_frame_reports_boxes_in_the_ground_frame(scan, tmp_path, detected):
    """Points with z = 0 on the ground, the sensor height given: the sensor-frame boxes, raised by it."""
    ref = json.loads((detected[1] / 'kitti.json').read_text())
    height = ref['sensor_height_m']
    levelled = scan[:, :4].astype(np.float64)
    levelled[:, 2] += height
    np.save(tmp_path / 'levelled.npy', levelled)
    code = cli.main(['detect', str(tmp_path / 'levelled.npy'), '--frame', 'ground', '--sensor-height', str(height),
                     '--score-threshold', '0.5', '--out', str(tmp_path / 'out'), '--no-png'])
    assert code == 0
    r = json.loads((tmp_path / 'out' / 'levelled.json').read_text())
    assert not (tmp_path / 'out' / 'levelled.png').exists()
    assert r['frame'] == 'ground' and r['sensor_height_source'] == 'given'
    assert r['sensor_height_m'] == pytest.approx(height)
    expected = boxes_of(ref)[[b['score'] >= 0.5 for b in ref['boxes']]]
    expected[:, 2] += height
    np.testing.assert_allclose(boxes_of(r), expected, atol=1e-3)


def _damaged(d, scan):
    """name -> (path, words the error line must hold)."""
    (d / 'three_cols.bin').write_bytes(scan[:, :3].tobytes())
    (d / 'odd_bytes.bin').write_bytes(scan[:, :4].tobytes()[:-2])
    (d / 'short_row.bin').write_bytes(scan[:, :4].tobytes()[:-8])
    (d / 'all_nan.bin').write_bytes(np.full((100, 4), np.nan, np.float32).tobytes())
    (d / 'empty.bin').write_bytes(b'')
    (d / 'garbage.pcd').write_text('this is not a point cloud\n')
    (d / 'garbage.ply').write_bytes(b'\xff\x00 not ply')
    np.save(d / 'flat.npy', scan[:, :2])
    (d / 'notes.txt').write_text('x y z\n')
    return {
        'missing': (d / 'missing.bin', ['no such file']),
        'wrong_columns': (d / 'three_cols.bin', ['do not look like x, y, z points', '--bin-columns']),
        'truncated_bytes': (d / 'odd_bytes.bin', ['truncated']),
        'truncated_row': (d / 'short_row.bin', ['truncated']),
        'all_nan': (d / 'all_nan.bin', ['NaN']),
        'empty': (d / 'empty.bin', ['no points']),
        'pcd_garbage': (d / 'garbage.pcd', ['open3d cannot read it']),
        'ply_garbage': (d / 'garbage.ply', ['open3d cannot read it']),
        'npy_columns': (d / 'flat.npy', ['(N, 3+)']),
        'unknown_suffix': (d / 'notes.txt', ['unknown point cloud format']),
    }


CASES = ('missing', 'wrong_columns', 'truncated_bytes', 'truncated_row', 'all_nan', 'empty', 'pcd_garbage',
         'ply_garbage', 'npy_columns', 'unknown_suffix')


@pytest.mark.parametrize('case', CASES)
def test_a_bad_file_is_one_line(case, scan, tmp_path, capfd):
    path, words = _damaged(tmp_path, scan)[case]
    extra = ['--bin-columns', '4'] if case == 'truncated_row' else []
    code = cli.main(['detect', str(path), '--out', str(tmp_path / 'out'), *extra])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith(f'error: {path}: '), err
    for word in words:
        assert word in err[0], (word, err[0])
    assert not (tmp_path / 'out').exists(), 'nothing written, no model loaded'


@pytest.mark.parametrize('topic, words', [('/nope', ['no topic /nope', TOPIC]),
                                          (None, ['2 PointCloud2 topics', '--topic'])])
def test_a_bag_without_the_topic_is_one_line(scan, tmp_path, capfd, topic, words):
    write_bag(tmp_path / 'two', scan[:100], topics=(TOPIC, '/agent2/lidar'), messages=1)
    code = cli.main(['detect', str(tmp_path / 'two'), *(['--topic', topic] if topic else [])])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {tmp_path / 'two'}: "), err
    assert all(w in err[0] for w in words), err[0]


def test_bad_files_among_good_ones_are_named_and_the_rest_detected(inputs, scan, tmp_path, capfd):
    bad = _damaged(tmp_path, scan)
    files = [bad['truncated_bytes'][0], inputs / 'kitti.bin', bad['pcd_garbage'][0]]
    code = cli.main(['detect', *map(str, files), '--no-png', '--out', str(tmp_path / 'out')])
    out, err = capfd.readouterr()
    assert code == 2
    # (torch may log a warning of its own on stderr when the detector loads)
    errors = [line for line in err.splitlines() if line.startswith('error: ')]
    assert [line.split(': ')[1] for line in errors] == [str(files[0]), str(files[2])], err
    assert (tmp_path / 'out' / 'kitti.json').exists()
    assert 'kitti: ' in out and '2 of 3 inputs failed' in out


def test_bad_files_in_a_real_process(scan, tmp_path):
    """As a user runs it: exit code 2, one line per bad file on stderr and nothing else."""
    bad = _damaged(tmp_path, scan)
    files = [bad['wrong_columns'][0], bad['ply_garbage'][0]]
    r = subprocess.run([sys.executable, '-m', 'coop_perception.cli', 'detect', *map(str, files)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert [line.split(': ')[:2] for line in lines] == [['error', str(f)] for f in files], r.stderr
    assert not (tmp_path / 'detect_out').exists()
