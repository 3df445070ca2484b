"""Reading the real V2X-Sim 2.0 download: conventions detected from the data, the category table,
visibility counted from the sweeps, and the synthetic twin of the real layout (`synth --mimic
v2xsim-real`) reading like our own layout of the same scenes."""
import json
import shutil

import numpy as np
import pytest

from coop_perception.data import visibility
from coop_perception.data.conventions import FRAME_EPOCH_US, TimeBase, detect_time_base
from coop_perception.data.labels import CLASSES, category_coverage, category_to_label
from coop_perception.data.mimic import MIMICS
from coop_perception.data.pcd_bin import read_pcd_bin
from coop_perception.data.stats import summarize
from coop_perception.data.synth import Scenario, ScenarioConfig, generate
from coop_perception.data.v2xsim import V2XSimDataset
from coop_perception.errors import UserError

PERIOD = 0.1
CFG = ScenarioConfig(seed=9, vehicles=2, frames=3, synchronous=True)


@pytest.fixture(scope='module')
def layouts(tmp_path_factory):
    """The same two synchronous scenes in our layout (v2.0-mini) and the real one (v2.0)."""
    root = tmp_path_factory.mktemp('layouts')
    generate(root / 'own', 2, CFG, 'v2.0-mini', progress=False)
    generate(root / 'real', 2, CFG, 'v2.0', progress=False, layout=MIMICS['v2xsim-real'])
    return root / 'own', root / 'real'


@pytest.fixture()
def real_copy(layouts, tmp_path):
    root = tmp_path / 'real'
    shutil.copytree(layouts[1], root, ignore=shutil.ignore_patterns(visibility.CACHE_FOLDER))
    return root


def _rows(root, version, table):
    return json.loads((root / version / f'{table}.json').read_text())


def _write(root, version, table, rows):
    (root / version / f'{table}.json').write_text(json.dumps(rows))


# ---------------------------------------------------------------------------- the twin
def test_twin_writes_what_the_real_download_looks_like(layouts):
    _, real = layouts
    assert sorted(p.name for p in real.iterdir()) == ['sweeps', 'v2.0']
    samples = _rows(real, 'v2.0', 'sample')
    assert sorted(s['timestamp'] for s in samples) == [0, 0, 1, 1, 2, 2]    # frame counters
    sds = _rows(real, 'v2.0', 'sample_data')
    assert {sd['width'] for sd in sds} == {0}
    anns = _rows(real, 'v2.0', 'sample_annotation')
    assert not any('agent_lidar_pts' in a or 'velocity' in a for a in anns)
    names = {c['name'] for c in _rows(real, 'v2.0', 'category')}
    assert 'human.pedestrian' in names and not names & {'vehicle.car', 'vehicle.van', 'vehicle.truck'}
    scenes = [s['name'] for s in _rows(real, 'v2.0', 'scene')]
    assert scenes == ['scene_9', 'scene_10'] and sorted(scenes) != scenes   # a name sort is wrong
    assert (real / 'sweeps' / 'LIDAR_TOP_id_1' / 'scene_10_000002.pcd.bin').exists()


def test_twin_reads_like_our_layout(layouts):
    own, real = V2XSimDataset(layouts[0]), V2XSimDataset(layouts[1], frame_period_s=PERIOD)
    assert [s.name for s in real.scenes] == ['scene_9', 'scene_10']      # table order
    assert [s.name for s in own.scenes] == ['scene_0', 'scene_1']
    seen_own, seen_real = [], []
    for s in range(2):
        start_own, start_real = own.sample(s, 0).timestamp_us, real.sample(s, 0).timestamp_us
        assert start_real == FRAME_EPOCH_US
        for f in range(CFG.frames):
            a, b = own.sample(s, f), real.sample(s, f)
            assert b.timestamp_us - start_real == a.timestamp_us - start_own == round(f * PERIOD * 1e6)
            assert sorted(a.agents) == sorted(b.agents) == [0, 1, 2]
            for k in a.agents:
                assert np.array_equal(a.agents[k].load_points(), b.agents[k].load_points())
                assert b.agents[k].timestamp_us - start_real == a.agents[k].timestamp_us - start_own
                assert np.allclose(a.agents[k].T_world_sensor, b.agents[k].T_world_sensor, atol=1e-9)
                assert b.agents[k].expected_points == 0
            assert np.allclose(a.gt.boxes, b.gt.boxes, atol=1e-9)
            assert np.array_equal(a.gt.labels, b.gt.labels) and (a.gt.labels >= 0).all()
            # velocities: stored vs finite differences over the converted timestamps
            assert np.abs(a.gt.velocities - b.gt.velocities).max() < 1.0
            for k in a.agents:
                seen_own.append(a.gt.agent_points[k] > 0)
                seen_real.append(b.gt.agent_points[k] > 0)
    # visibility: the ray caster's hit owners vs points counted in the boxes (a pedestrian seen
    # only at the feet, below the ground margin, is the rare miss)
    seen_own, seen_real = np.concatenate(seen_own), np.concatenate(seen_real)
    assert (seen_own != seen_real).mean() < 0.01 and seen_real.sum() > 100


def test_conventions_are_detected_and_summarised(layouts):
    own, real = V2XSimDataset(layouts[0]), V2XSimDataset(layouts[1], frame_period_s=PERIOD)
    c = real.conventions
    assert c.version == 'v2.0' and not c.version_given
    assert c.time == TimeBase('frame', PERIOD, 1.0)
    assert c.row_lengths == {5: 3} and not c.width_is_point_count
    assert c.visibility == 'counted' and c.count_cache == str(layouts[1] / 'visibility_cache' / 'v2.0')
    assert c.categories['unmapped'] == [] and c.categories['fallback'] == []
    assert c.pose['verdict'] == 'ok' and c.pose['chain'] >= 0.5 > c.pose['mirrored']
    assert c.scene_order == ['scene_9', 'scene_10']
    text = '\n'.join(c.lines())
    for phrase in ('v2.0 (detected)', 'frame counters x 0.1 s', 'table order (scene_9, scene_10)',
                   'unmapped (read as other): none', '3 files x 5 columns', 'width is not the point count',
                   'counted from the sweeps', 'T_world_ego @ T_ego_sensor ok'):
        assert phrase in text, phrase
    assert set(c.differences()) and not own.conventions.differences()
    o = own.conventions
    assert o.time.unit == 'us' and o.time.step == PERIOD * 1e6 and o.width_is_point_count
    assert o.visibility == 'annotations' and o.version == 'v2.0-mini'
    s_own, s_real = summarize(own), summarize(real)
    assert s_real['conventions']['time']['unit'] == 'frame'
    for key in ('frames', 'agents', 'points_per_scan', 'objects_near_ego', 'occluded_visible_to_collaborator'):
        assert s_own[key] == s_real[key], key
    # the synthetic writer records each agent's LiDAR profile, the real layout does not
    assert set(s_own['lidar_profiles']) == {'carla32'} and set(s_real['lidar_profiles']) == {'unrecorded'}
    assert sum(s_own['lidar_profiles'].values()) == sum(s_real['lidar_profiles'].values())


# ---------------------------------------------------------------------------- timestamps
def test_time_base_rules(tmp_path):
    table = tmp_path / 'sample.json'
    none = np.zeros(0)

    def detect(stamps, period=None, offsets=none):
        return detect_time_base({'scene_0': stamps}, offsets, period, table)

    assert detect([1_700_000_000_000_000 + i * 50_000 for i in range(4)]) == TimeBase('us', None, 50_000)
    assert detect([3, 4, 6], 0.05) == TimeBase('frame', 0.05, 1.5)
    assert detect([1_700_000_000_000_000]).unit == 'us'               # far beyond any frame counter
    assert detect([4], 0.1).to_us(4) == FRAME_EPOCH_US + 400_000
    with pytest.raises(UserError, match='count frames .* --frame-period'):
        detect([0, 1, 2])
    with pytest.raises(UserError, match='fit neither microseconds .* nor frame counters .*steps from 500 to 500'
                                        '.*--frame-period'):
        detect([0, 500, 1000])
    with pytest.raises(UserError, match='no scene has two samples.*--frame-period'):
        detect([12])
    with pytest.raises(UserError, match='microseconds already.*--frame-period is only'):
        detect([0, 100_000], 0.1)
    with pytest.raises(UserError, match='do not increase'):
        detect([0, 2, 1])
    with pytest.raises(UserError, match='tables disagree on the unit'):
        detect([0, 1, 2], 0.1, offsets=np.array([0, 100_000]))


def test_frame_counters_need_the_period(layouts):
    with pytest.raises(UserError, match=r'sample\.json: timestamps count frames.*--frame-period'):
        V2XSimDataset(layouts[1])
    with pytest.raises(UserError, match='microseconds already'):
        V2XSimDataset(layouts[0], frame_period_s=PERIOD)


# ---------------------------------------------------------------------------- categories
NUSCENES = {
    'vehicle.car': 'car', 'vehicle.emergency.police': 'car', 'vehicle.emergency.ambulance': 'truck',
    'vehicle.bus.rigid': 'truck', 'vehicle.bus.bendy': 'truck', 'vehicle.truck': 'truck',
    'vehicle.trailer': 'truck', 'vehicle.construction': 'truck', 'vehicle.bicycle': 'cyclist',
    'vehicle.motorcycle': 'cyclist', 'human.pedestrian.adult': 'pedestrian', 'human.pedestrian.child': 'pedestrian',
    'human.pedestrian.construction_worker': 'pedestrian', 'human.pedestrian.police_officer': 'pedestrian',
    'human.pedestrian.personal_mobility': 'pedestrian', 'human.pedestrian.stroller': 'pedestrian',
    'human.pedestrian.wheelchair': 'pedestrian', 'animal': None, 'movable_object.barrier': None,
    'movable_object.trafficcone': None, 'movable_object.pushable_pullable': None, 'movable_object.debris': None,
    'static_object.bicycle_rack': None,
}
CARLA_CAR_BLUEPRINTS = (   # the 21 of coperception's class map, 2 of them large
    'vehicle.audi.a2', 'vehicle.audi.etron', 'vehicle.audi.tt', 'vehicle.bmw.grandtourer', 'vehicle.bmw.isetta',
    'vehicle.chevrolet.impala', 'vehicle.citroen.c3', 'vehicle.dodge_charger.police', 'vehicle.jeep.wrangler_rubicon',
    'vehicle.lincoln.mkz2017', 'vehicle.mercedes-benz.coupe', 'vehicle.mini.cooperst', 'vehicle.mustang.mustang',
    'vehicle.nissan.micra', 'vehicle.nissan.patrol', 'vehicle.seat.leon', 'vehicle.tesla.cybertruck',
    'vehicle.tesla.model3', 'vehicle.toyota.prius', 'vehicle.volkswagen.t2', 'vehicle.carlamotors.carlacola',
)
CARLA_TWO_WHEELER_BLUEPRINTS = ('vehicle.bh.crossbike', 'vehicle.diamondback.century', 'vehicle.gazelle.omafiets',
                                'vehicle.harley-davidson.low_rider', 'vehicle.kawasaki.ninja', 'vehicle.yamaha.yzf')


def _expected(name):
    if name in NUSCENES:
        return NUSCENES[name]
    if name in CARLA_TWO_WHEELER_BLUEPRINTS:
        return 'cyclist'
    if name in ('vehicle.tesla.cybertruck', 'vehicle.carlamotors.carlacola'):
        return 'truck'
    return {'human.pedestrian': 'pedestrian'}.get(name, 'car')


def test_both_vocabularies_map():
    assert len(CARLA_CAR_BLUEPRINTS) == 21 and len(CARLA_TWO_WHEELER_BLUEPRINTS) == 6
    names = [*NUSCENES, *CARLA_CAR_BLUEPRINTS, *CARLA_TWO_WHEELER_BLUEPRINTS, 'human.pedestrian']
    for name in names:
        want = _expected(name)
        assert category_to_label(name) == (CLASSES.index(want) if want else -1), name
    coverage = category_coverage(names)
    assert coverage['unmapped'] == [] and coverage['fallback'] == []
    assert coverage['classes'] == {n: _expected(n) for n in names}
    # an unknown blueprint is a car by the fallback, and said so; anything else is listed unmapped
    coverage = category_coverage(['vehicle.newmaker.model', 'static.prop.bench', 'vehicle.car'])
    assert coverage['fallback'] == ['vehicle.newmaker.model'] and coverage['unmapped'] == ['static.prop.bench']
    assert category_to_label('vehicle.newmaker.model') == CLASSES.index('car')
    assert category_to_label('static.prop.bench') == -1


def test_unmapped_names_are_listed_and_warned_once(real_copy, caplog):
    cats = _rows(real_copy, 'v2.0', 'category')
    cats[0]['name'] = 'static.prop.bench'
    _write(real_copy, 'v2.0', 'category', cats)
    with caplog.at_level('WARNING', logger='coop_perception.data.v2xsim'):
        ds = V2XSimDataset(real_copy, frame_period_s=PERIOD)
    assert ds.conventions.categories['unmapped'] == ['static.prop.bench']
    assert 'unmapped (read as other): static.prop.bench' in '\n'.join(ds.conventions.lines())
    warned = [r.getMessage() for r in caplog.records if 'static.prop.bench' in r.getMessage()]
    assert len(warned) == 1


# ---------------------------------------------------------------------------- visibility and its cache
def test_counts_are_cached_and_cache_falls_back(real_copy, tmp_path, monkeypatch):
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'user_cache'))
    ds = V2XSimDataset(real_copy, frame_period_s=PERIOD)
    first = ds.sample(1, 2).gt.agent_points
    folder = real_copy / visibility.CACHE_FOLDER / 'v2.0'
    assert len(list(folder.glob('*.npz'))) >= 2          # the probe sample and this one

    def no_counting(sample):
        raise AssertionError('counted again')
    monkeypatch.setattr(visibility, 'count_sample', no_counting)
    again = V2XSimDataset(real_copy, frame_period_s=PERIOD).sample(1, 2).gt.agent_points
    assert all(np.array_equal(first[k], again[k]) for k in first)
    monkeypatch.undo()
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'user_cache'))

    # dataset folder not writable: the user's cache; neither: memory
    shutil.rmtree(real_copy / visibility.CACHE_FOLDER)
    (real_copy / visibility.CACHE_FOLDER).write_text('not a folder')
    ds = V2XSimDataset(real_copy, frame_period_s=PERIOD)
    assert ds.conventions.count_cache.startswith(str(tmp_path / 'user_cache'))
    assert all(np.array_equal(first[k], ds.sample(1, 2).gt.agent_points[k]) for k in first)
    (tmp_path / 'blocked').write_text('')
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'blocked'))
    ds = V2XSimDataset(real_copy, frame_period_s=PERIOD)
    assert ds.conventions.count_cache is None and 'memory only' in '\n'.join(ds.conventions.lines())
    assert all(np.array_equal(first[k], ds.sample(1, 2).gt.agent_points[k]) for k in first)


# ---------------------------------------------------------------------------- sweeps, width, folders, poses
def test_row_length_comes_from_the_data(tmp_path):
    pts = Scenario(ScenarioConfig(seed=1, vehicles=1, frames=1)).frame(0).scans[1].points
    pts = pts[:len(pts) // 20 * 20]                       # divisible by 4 and by 5 in both layouts
    five, four = tmp_path / 'five.bin', tmp_path / 'four.bin'
    pts.tofile(five)
    pts[:, :4].tofile(four)
    assert np.array_equal(read_pcd_bin(five), pts)
    got = read_pcd_bin(four)
    assert np.array_equal(got[:, :4], pts[:, :4]) and np.all(got[:, 4] == -1)
    # a 5-column file missing a few floats that a 4-column reading would accept
    damaged = tmp_path / 'damaged.bin'
    pts.ravel()[:-5 * 4 - 4].tofile(damaged)
    assert damaged.stat().st_size % 16 == 0
    with pytest.raises(UserError, match='truncated or damaged.*rows of 4'):
        read_pcd_bin(damaged)
    tiny = tmp_path / 'tiny.bin'
    pts[:4].tofile(tiny)                                  # 20 floats: too few to tell
    assert read_pcd_bin(tiny, row_length_hint=5).shape == (4, 5)
    with pytest.raises(UserError, match='too few'):
        read_pcd_bin(tiny)


def test_width_is_trusted_only_when_it_counts_the_points(layouts, tmp_path):
    root = tmp_path / 'own'
    shutil.copytree(layouts[0], root)
    sds = _rows(root, 'v2.0-mini', 'sample_data')
    for sd in sds:
        sd['width'] = 7                                  # means something else
    _write(root, 'v2.0-mini', 'sample_data', sds)
    ds = V2XSimDataset(root)
    assert not ds.conventions.width_is_point_count
    assert len(ds.sample(0, 0).agents[1].load_points()) > 30000


def test_metadata_folder_is_detected(layouts, tmp_path):
    root = tmp_path / 'both'
    shutil.copytree(layouts[0], root)
    assert V2XSimDataset(root).conventions.version == 'v2.0-mini'
    shutil.copytree(root / 'v2.0-mini', root / 'v2.0')
    with pytest.raises(UserError, match='holds both v2.0 and v2.0-mini: choose one with --version'):
        V2XSimDataset(root)
    assert V2XSimDataset(root, 'v2.0').conventions.version_given
    (root / 'v2.0').rename(root / 'v1.0-trainval')
    (root / 'v2.0-mini').rename(root / 'other')
    with pytest.raises(UserError, match=r'no metadata folder v2\.0 or v2\.0-mini \(found: other, v1\.0-trainval\)'):
        V2XSimDataset(root)


def test_points_off_their_boxes_are_an_error(layouts, tmp_path):
    root = tmp_path / 'mirrored'
    shutil.copytree(layouts[0], root)
    for path in (root / 'sweeps').rglob('*.pcd.bin'):
        pts = np.fromfile(path, np.float32).reshape(-1, 5)
        pts[:, 0] *= -1
        pts.tofile(path)
    with pytest.raises(UserError, match=r'do not hold its points under T_world_ego @ T_ego_sensor \(\d+% .*mirrored'):
        V2XSimDataset(root)
