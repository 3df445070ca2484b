"""Dataset -> rosbag2 -> arrays, in both storage formats; rosbag2 layout; damaged bags."""
import os
import shutil
import sqlite3
import struct

import numpy as np
import pytest
import yaml
from rosbags.interfaces import QosDurability, QosReliability
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_types_from_msg, get_typestore

from coop_perception import cli
from coop_perception.data import bag as bagmod
from coop_perception.data.objects import object_boxes, object_velocities
from coop_perception.data.v2xsim import V2XSimDataset
from coop_perception.errors import UserError

STORAGE_FILE = {'mcap': '.mcap', 'sqlite3': '.db3'}


@pytest.fixture(scope='module')
def dataset(tiny_dataset):
    return V2XSimDataset(tiny_dataset)


@pytest.fixture(scope='module', params=['mcap', 'sqlite3'])
def recorded(request, dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / 'scene'
    summary = bagmod.write_scene_bag(dataset, 0, out, storage=request.param)
    return request.param, out, summary


def _storage_file(path):
    return next(p for p in path.iterdir() if p.suffix in ('.mcap', '.db3'))


def test_round_trip_is_exact(recorded, dataset):
    storage, path, summary = recorded
    rec = bagmod.read_scene_bag(path)
    scene = dataset.scenes[0]
    n = len(scene.sample_tokens)
    assert rec.scene == scene.name == summary['scene']
    assert summary['frames'] == n and summary['agents'] == [0, 1, 2]
    assert sorted(rec.lidar) == sorted(rec.odom) == [0, 1, 2]
    assert len(rec.objects) == len(rec.marker_boxes) == n
    worst_pose = 0.0
    for f in range(n):
        s = dataset.sample(0, f)
        for k, a in s.agents.items():
            t_ns, points = rec.lidar[k][f]
            assert t_ns == a.timestamp_us * 1000
            np.testing.assert_array_equal(points, a.load_points())
            t_odom, T = rec.odom[k][f]
            assert t_odom == t_ns
            worst_pose = max(worst_pose, np.abs(T - a.T_world_sensor).max(),
                             np.abs(rec.tf[f'agent{k}/base_link'][f][1] - a.T_world_ego).max())
            parent, T_static = rec.tf_static[f'agent{k}/lidar']
            assert parent == f'agent{k}/base_link'
            np.testing.assert_allclose(T_static, a.T_ego_sensor, atol=1e-12)
        t_gt, objects = rec.objects[f]
        assert t_gt == s.timestamp_us * 1000
        np.testing.assert_array_equal(object_boxes(objects), s.gt.boxes)
        np.testing.assert_array_equal(object_velocities(objects), s.gt.velocities)
        np.testing.assert_array_equal(objects['label'], s.gt.labels)
        assert len(set(objects['id'])) == len(objects)
        np.testing.assert_allclose(rec.marker_boxes[f][1][:, :6], s.gt.boxes[:, :6], atol=1e-9)
    # Rotations travel as quaternions: equal up to float64 rounding.
    assert worst_pose < 1e-12


def test_instance_ids_are_stable_across_frames(recorded, dataset):
    rec = bagmod.read_scene_bag(recorded[1])
    ids = {}
    for f, (_, objects) in enumerate(rec.objects):
        for tok, i in zip(dataset.sample(0, f).gt.instance_tokens, objects['id']):
            assert ids.setdefault(tok, i) == i


def test_layout_matches_rosbag2(recorded):
    """What `ros2 bag play` reads: metadata.yaml v9 with QoS lists, one storage file, time order."""
    storage, path, summary = recorded
    meta = yaml.safe_load((path / 'metadata.yaml').read_text())['rosbag2_bagfile_information']
    assert meta['version'] == 9 and meta['storage_identifier'] == storage
    assert meta['relative_file_paths'] == [_storage_file(path).name]
    assert _storage_file(path).suffix == STORAGE_FILE[storage]
    topics = {t['topic_metadata']['name']: t for t in meta['topics_with_message_count']}
    assert meta['message_count'] == sum(t['message_count'] for t in topics.values())
    for t in topics.values():
        tm = t['topic_metadata']
        assert tm['serialization_format'] == 'cdr'
        assert tm['type_description_hash'].startswith('RIHS01_')
        (qos,) = tm['offered_qos_profiles']
        assert set(qos) == {'history', 'depth', 'reliability', 'durability', 'deadline', 'lifespan',
                            'liveliness', 'liveliness_lease_duration', 'avoid_ros_namespace_conventions'}
    qos = {name: t['topic_metadata']['offered_qos_profiles'][0] for name, t in topics.items()}
    assert qos['/tf_static']['durability'] == 'transient_local' and qos['/tf_static']['depth'] == 1
    assert qos['/agent0/lidar']['reliability'] == 'best_effort'
    assert qos['/agent0/odom']['reliability'] == 'reliable'
    assert topics['/tf_static']['message_count'] == 1
    assert topics['/tf']['topic_metadata']['type'] == 'tf2_msgs/msg/TFMessage'
    with bagmod.BagReader(path) as bag:
        times = [t for _, _, t, _ in bag.raw_messages()]
        assert times == sorted(times)
        assert bag.topics['/tf_static'].qos[0].durability == QosDurability.TRANSIENT_LOCAL
        assert bag.topics['/agent1/lidar'].qos[0].reliability == QosReliability.BEST_EFFORT
    f = _storage_file(path)
    if storage == 'mcap':
        data = f.read_bytes()
        assert data[:8] == data[-8:] == b'\x89MCAP0\r\n'
        # Header record (opcode 1, 8-byte length, then the profile string): "ros2", which the
        # rosbag2 MCAP plugin requires.
        (plen,) = struct.unpack_from('<I', data, 17)
        assert data[8] == 1 and data[21:21 + plen] == b'ros2'
        assert b'rosbag2' in data[-8192:] and b'serialized_metadata' in data
    else:
        con = sqlite3.connect(f)
        tables = {r[0] for r in con.execute("select name from sqlite_master where type='table'")}
        assert {'schema', 'metadata', 'topics', 'messages', 'message_definitions'} <= tables
        assert con.execute('select schema_version from schema').fetchone()[0] >= 4
        con.close()


def test_scene_by_name_and_bad_scene(dataset, tmp_path):
    name = dataset.scenes[0].name
    assert bagmod.write_scene_bag(dataset, name, tmp_path / 'b')['scene'] == name
    with pytest.raises(UserError, match='no such scene'):
        bagmod.write_scene_bag(dataset, 'nope', tmp_path / 'c')
    with pytest.raises(UserError, match='out of range'):
        bagmod.write_scene_bag(dataset, 3, tmp_path / 'c')
    with pytest.raises(UserError, match='exists already'):
        bagmod.write_scene_bag(dataset, 0, tmp_path / 'b')
    with pytest.raises(UserError, match='unknown storage'):
        bagmod.write_scene_bag(dataset, 0, tmp_path / 'd', storage='rosbag1')
    assert not (tmp_path / 'c').exists() and not (tmp_path / 'd').exists()


def test_failed_recording_leaves_nothing(tiny_dataset, tmp_path):
    root = shutil.copytree(tiny_dataset, tmp_path / 'data')
    dataset = V2XSimDataset(root)
    sorted((root / 'sweeps').rglob('*.bin'))[-1].unlink()
    with pytest.raises(UserError, match='LiDAR file is missing'):
        bagmod.write_scene_bag(dataset, 0, tmp_path / 'partial')
    assert not (tmp_path / 'partial').exists()


def test_cli_to_bag(tiny_dataset, tmp_path, capsys):
    out = tmp_path / 'cli_bag'
    assert cli.main(['to-bag', str(tiny_dataset), '--scene', '0', '--out', str(out),
                     '--storage', 'sqlite3']) == 0
    assert 'sqlite3' in capsys.readouterr().out
    assert (out / 'metadata.yaml').exists() and _storage_file(out).suffix == '.db3'
    assert cli.main(['to-bag', str(tiny_dataset), '--out', str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('error: ') and 'exists already' in err and '\n' not in err


# --------------------------------------------------------------------------- damaged bags
def _damage(src, dst, how):
    shutil.copytree(src, dst)
    f = _storage_file(dst)
    if how == 'no-metadata':
        (dst / 'metadata.yaml').unlink()
    elif how == 'truncated':
        os.truncate(f, f.stat().st_size // 2)
    elif how == 'empty-file':
        os.truncate(f, 0)
    elif how == 'garbage-header':
        with open(f, 'r+b') as fh:
            fh.write(b'\x00garbage' * 64)
    elif how == 'bad-yaml':
        (dst / 'metadata.yaml').write_text('rosbag2_bagfile_information: [\n')
    elif how == 'missing-file':
        f.unlink()
    return dst


@pytest.mark.parametrize('how', ['no-metadata', 'truncated', 'empty-file', 'garbage-header',
                                 'bad-yaml', 'missing-file'])
def test_damaged_bag_is_one_line_user_error(recorded, tmp_path, how):
    bad = _damage(recorded[1], tmp_path / 'bad', how)
    with pytest.raises(UserError) as exc:
        bagmod.read_scene_bag(bad)
    text = str(exc.value)
    assert text.startswith(str(bad)) and '\n' not in text
    if how == 'no-metadata':
        assert 'metadata.yaml is missing' in text


def _bag_with_custom_type(path, with_definition):
    store = get_typestore(Stores.ROS2_KILTED)
    store.register(get_types_from_msg('int32 value', 'foo_msgs/msg/Bar'))
    with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP) as w:
        if with_definition:
            conn = w.add_connection('/foo', 'foo_msgs/msg/Bar', typestore=store)
        else:
            conn = w.add_connection('/foo', 'foo_msgs/msg/Bar', msgdef='', rihs01='RIHS01_' + '0' * 64)
        w.write(conn, 1, store.serialize_cdr(store.types['foo_msgs/msg/Bar'](value=7), 'foo_msgs/msg/Bar'))
    return path


def test_custom_and_unknown_message_types(tmp_path):
    with bagmod.BagReader(_bag_with_custom_type(tmp_path / 'custom', True)) as bag:
        ((topic, _, msg),) = list(bag.messages())
        assert topic == '/foo' and msg.value == 7
    with bagmod.BagReader(_bag_with_custom_type(tmp_path / 'unknown', False)) as bag:
        assert not bag.topics['/foo'].known
        with pytest.raises(UserError, match=r'unknown message type for /foo \(foo_msgs/msg/Bar\)'):
            list(bag.messages())
        assert len(list(bag.raw_messages())) == 1
