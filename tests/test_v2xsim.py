import json
import shutil

import numpy as np
import pytest

from coop_perception.data.synth import Scenario, ScenarioConfig
from coop_perception.data.v2xsim import TABLES, V2XSimDataset, V2XSimWriter
from coop_perception.errors import UserError


@pytest.fixture()
def dataset_copy(tiny_dataset, tmp_path):
    root = tmp_path / 'ds'
    shutil.copytree(tiny_dataset, root)
    return root


def _tables(root):
    return {t: json.loads((root / 'v2.0-mini' / f'{t}.json').read_text()) for t in TABLES}


def test_round_trip_is_exact(tmp_path):
    cfg = ScenarioConfig(seed=5, vehicles=2, frames=3)
    frames = list(Scenario(cfg, 0).frames())
    writer = V2XSimWriter(tmp_path, 'v2.0-mini')
    writer.begin_scene('scene_0')
    for f in frames:
        writer.add_frame(f)
    writer.end_scene()
    writer.close()

    ds = V2XSimDataset(tmp_path)
    assert [s.name for s in ds.scenes] == ['scene_0'] and ds.num_frames(0) == 3
    for f in frames:
        s = ds.sample(0, f.index)
        assert s.timestamp_us == f.timestamp_us
        for scan in f.scans:
            a = s.agents[scan.agent_id]
            assert np.array_equal(a.load_points(), scan.points)
            assert a.timestamp_us == scan.timestamp_us
            assert np.allclose(a.T_world_ego, scan.T_world_ego, atol=1e-9)
            assert np.allclose(a.T_world_sensor, scan.T_world_ego @ scan.T_ego_sensor, atol=1e-9)
        assert len(s.gt.boxes) == len(f.boxes)
        # compare as sets of rows: annotation order is the writer's
        want = np.round(np.c_[f.boxes, f.velocities], 9)
        have = np.round(np.c_[s.gt.boxes, s.gt.velocities], 9)
        want[:, 6] = np.round(np.arctan2(np.sin(f.boxes[:, 6]), np.cos(f.boxes[:, 6])), 9)
        assert sorted(map(tuple, want)) == sorted(map(tuple, have))
        assert set(s.gt.agent_points) == {0, 1, 2}
        assert sum(c.sum() for c in s.gt.agent_points.values()) == sum(c.sum() for c in f.agent_points.values())
    # each vehicle agent's own box is found; the RSU has none
    s = ds.sample(0, 1)
    assert s.agent_box(0) == -1
    assert s.agent_box(1) >= 0 and s.agent_box(2) >= 0 and s.agent_box(1) != s.agent_box(2)


def test_tables_are_consistent(tiny_dataset):
    t = _tables(tiny_dataset)
    tokens = {name: {r['token'] for r in rows} for name, rows in t.items()}
    refs = [('sample', 'scene_token', 'scene'), ('sample_data', 'sample_token', 'sample'),
            ('sample_data', 'ego_pose_token', 'ego_pose'),
            ('sample_data', 'calibrated_sensor_token', 'calibrated_sensor'),
            ('calibrated_sensor', 'sensor_token', 'sensor'),
            ('sample_annotation', 'sample_token', 'sample'),
            ('sample_annotation', 'instance_token', 'instance'),
            ('sample_annotation', 'visibility_token', 'visibility'),
            ('instance', 'category_token', 'category'), ('scene', 'log_token', 'log')]
    for table, key, target in refs:
        for row in t[table]:
            assert row[key] in tokens[target], (table, key)
    for row in t['sample_annotation']:
        assert all(a in tokens['attribute'] for a in row['attribute_tokens'])
    # prev/next chains are complete and mutually consistent
    for table in ('sample', 'sample_data', 'sample_annotation'):
        by = {r['token']: r for r in t[table]}
        for r in t[table]:
            if r['next']:
                assert by[r['next']]['prev'] == r['token']
            if r['prev']:
                assert by[r['prev']]['next'] == r['token']
    for scene in t['scene']:
        chain, tok = [], scene['first_sample_token']
        while tok:
            chain.append(tok)
            tok = {r['token']: r for r in t['sample']}[tok]['next']
        assert len(chain) == scene['nbr_samples'] and chain[-1] == scene['last_sample_token']
    for inst in t['instance']:
        n, tok = 0, inst['first_annotation_token']
        by = {r['token']: r for r in t['sample_annotation']}
        while tok:
            n += 1
            tok = by[tok]['next']
        assert n == inst['nbr_annotations']
    assert {s['channel'] for s in t['sensor']} == {'LIDAR_TOP_id_0', 'LIDAR_TOP_id_1', 'LIDAR_TOP_id_2'}
    sd = t['sample_data'][0]
    assert sd['filename'].startswith('sweeps/LIDAR_TOP_id_') and sd['filename'].endswith('.pcd.bin')
    ann = t['sample_annotation'][0]
    assert len(ann['rotation']) == 4 and len(ann['size']) == 3 and ann['size'][1] >= ann['size'][0] * 0.5


def test_real_dataset_quirks(dataset_copy):
    root = dataset_copy
    meta = root / 'v2.0-mini'
    t = _tables(root)
    # 1. a semantic-LiDAR channel with its own sample_data must be ignored
    sem_sensor = {'token': 'semsensor', 'channel': 'SEMLIDAR_TOP_id_1', 'modality': 'lidar'}
    sem_cs = {'token': 'semcs', 'sensor_token': 'semsensor', 'translation': [0, 0, 0],
              'rotation': [1, 0, 0, 0], 'camera_intrinsic': []}
    first = t['sample_data'][0]
    sem_sd = dict(first, token='semsd', calibrated_sensor_token='semcs', filename='sweeps/nowhere.bin',
                  prev='', next='')
    t['sensor'].append(sem_sensor)
    t['calibrated_sensor'].append(sem_cs)
    t['sample_data'].append(sem_sd)
    # 2. agent 2 missing from the last sample
    last_sample = t['scene'][0]['last_sample_token']
    t['sample_data'] = [r for r in t['sample_data']
                        if not (r['sample_token'] == last_sample and 'id_2' in r['filename'])]
    # 3. a 4-column sweep without a point count (as in real V2X-Sim)
    sd0 = next(r for r in t['sample_data'] if 'id_1' in r['filename'] and r['sample_token'] != last_sample)
    pts = np.fromfile(root / sd0['filename'], np.float32).reshape(-1, 5)
    pts[:, :4].tofile(root / sd0['filename'])
    sd0['width'] = 0
    for name in ('sensor', 'calibrated_sensor', 'sample_data'):
        (meta / f'{name}.json').write_text(json.dumps(t[name]))
    assert not (meta / 'lidarseg.json').exists()

    ds = V2XSimDataset(root)
    assert ds.agents() == [0, 1, 2]
    last = ds.sample(0, ds.num_frames(0) - 1)
    assert sorted(last.agents) == [0, 1]
    sample = next(s for s in ds.samples() if sd0['token'] in
                  [a.sample_data_token for a in s.agents.values()])
    loaded = sample.agents[1].load_points()
    assert loaded.shape == (len(pts), 5) and np.all(loaded[:, 4] == -1)
    assert np.array_equal(loaded[:, :4], pts[:, :4])


def test_errors_name_the_file(dataset_copy, tmp_path):
    with pytest.raises(UserError, match='does not exist'):
        V2XSimDataset(tmp_path / 'nope')
    with pytest.raises(UserError, match='metadata folder not found.*v2.0-mini'):
        V2XSimDataset(dataset_copy, 'v1.0-trainval')
    ds = V2XSimDataset(dataset_copy)
    agent = ds.sample(0, 0).agents[1]
    data = agent.path.read_bytes()
    agent.path.write_bytes(data[:-8])
    with pytest.raises(UserError, match='truncated') as exc:
        agent.load_points()
    assert str(agent.path) in str(exc.value)
    t = _tables(dataset_copy)
    t['sample_data'][0]['ego_pose_token'] = 'dangling'
    (dataset_copy / 'v2.0-mini' / 'sample_data.json').write_text(json.dumps(t['sample_data']))
    with pytest.raises(UserError, match="missing ego_pose token 'dangling'") as exc:
        V2XSimDataset(dataset_copy)
    assert 'sample_data.json' in str(exc.value)
