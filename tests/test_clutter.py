"""Street clutter: only on request, the same town and traffic with it, items on the sidewalks'
bands and clear of every actor, porous vegetation, seen by the LiDAR, and `synth --clutter`."""
import numpy as np
import pytest

from coop_perception import cli
from coop_perception.data.clutter import CURB_BAND, FRONTAGE_BAND, clear_of_actors, street_clutter
from coop_perception.data.commands import clutter_density
from coop_perception.data.roads import RoadLayout
from coop_perception.data.synth import PRESETS, Scenario, ScenarioConfig
from coop_perception.data.traffic import TrafficConfig
from coop_perception.geometry import bev_corners

QUICK = TrafficConfig(warmup=5.0)


def scene(clutter: float) -> Scenario:
    return Scenario(ScenarioConfig(seed=5, vehicles=2, frames=3, traffic=QUICK, clutter=clutter))


@pytest.fixture(scope='module')
def pair():
    return scene(0.0), scene(1.0)


def test_clutter_adds_static_boxes_and_leaves_town_and_traffic_alone(pair):
    plain, cluttered = pair
    n = len(plain.world.boxes)
    assert len(cluttered.world.boxes) > n + 1000
    assert np.array_equal(cluttered.world.boxes[:n], plain.world.boxes)
    a, b = plain.frame(1), cluttered.frame(1)
    assert np.array_equal(a.boxes, b.boxes) and np.array_equal(a.instance_ids, b.instance_ids)
    assert [s.T_world_ego.tobytes() for s in a.scans] == [s.T_world_ego.tobytes() for s in b.scans]
    again = scene(1.0)
    assert np.array_equal(again.world.boxes, cluttered.world.boxes)


def test_items_stand_on_the_sidewalk_bands_clear_of_roads_and_walking_line():
    layout = RoadLayout()
    boxes, materials = street_clutter(layout, 1.0, np.random.default_rng(0))
    assert len(boxes) == len(materials) and {'vegetation', 'metal', 'plastic', 'glass'} <= set(materials)
    low = boxes[:, 2] - boxes[:, 5] / 2 < 5.0      # the lamps' arms reach over the road, 7 m up
    corners = bev_corners(boxes[low])               # (n, 4, 2)
    for heading, axis in (('E', 0), ('N', 1)):
        other = 1 - axis
        edge = layout.half_width(heading)
        crossing = layout.half_width('N' if heading == 'E' else 'E') + layout.sidewalk_width
        on_road = np.abs(corners[:, :, axis]).min(1) > crossing
        across = np.abs(corners[on_road][:, :, other]) - edge
        near = across.max(1) < layout.sidewalk_width + 1.0
        across = across[near]
        assert len(across) > 100
        in_curb = (across.min(1) >= CURB_BAND[0] - 0.5) & (across.max(1) <= CURB_BAND[1] + 0.5)
        in_frontage = (across.min(1) >= FRONTAGE_BAND[0] - 0.05) & (across.max(1) <= FRONTAGE_BAND[1] + 0.05)
        assert np.all(in_curb | in_frontage)
    assert len(street_clutter(layout, 0.0, np.random.default_rng(0))[0]) == 0
    # denser on request
    assert len(street_clutter(layout, 2.0, np.random.default_rng(0))[0]) > len(boxes)


def test_clear_of_actors():
    boxes = np.array([[0.0, 0, 0.5, 1, 1, 1, 0],       # where the walker is
                      [5.0, 0, 0.5, 1, 1, 1, 0],       # away from it
                      [0.0, 0, 3.0, 1, 1, 1, 0]])      # above its head (a crown)
    keep = clear_of_actors(boxes, np.array([[0.3, 0.2]]), np.array([0.4]), np.array([1.8]))
    assert keep.tolist() == [False, True, True]


def test_no_actor_walks_through_clutter(pair):
    _, cluttered = pair
    boxes = cluttered.world.boxes[len(pair[0].world.boxes):]
    for f in range(3):
        frame = cluttered.frame(f)
        gt = frame.boxes
        d = np.linalg.norm(gt[:, None, :2] - boxes[None, :, :2], axis=-1)
        reach = 0.5 * np.hypot(gt[:, 3], gt[:, 4])[:, None] + 0.5 * np.hypot(boxes[:, 3], boxes[:, 4])[None]
        bottom = boxes[:, 2] - boxes[:, 5] / 2
        top = gt[:, 2] + gt[:, 5] / 2
        assert not np.any((d < reach) & (bottom[None] < top[:, None]))


def test_lidar_sees_the_clutter_and_vegetation_is_made_of_leaf_cubes(pair):
    plain, cluttered = pair
    a, b = plain.frame(1).scans, cluttered.frame(1).scans
    # the scans differ where clutter stands: points move closer to the sensor in some directions
    moved = [np.mean(np.linalg.norm(y.points[:, :2], axis=1)) < np.mean(np.linalg.norm(x.points[:, :2], axis=1))
             for x, y in zip(a, b)]
    assert all(moved)
    hedge = street_clutter(RoadLayout(), 1.0, np.random.default_rng(0))
    veg = hedge[0][np.array(hedge[1]) == 'vegetation']
    small = veg[:, 3] <= 0.3 + 1e-9
    assert small.mean() > 0.8      # leaves: clusters of small cubes with gaps between them


def test_preset_and_cli(tmp_path, capsys):
    assert PRESETS['test_clutter']['seed'] == PRESETS['test']['seed'] and PRESETS['test_clutter']['clutter'] > 0
    assert ScenarioConfig().clutter == 0.0
    for bad in ('9', '2:1', 'lots'):
        assert cli.main(['synth', '--out', str(tmp_path / 'x'), '--clutter', bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith('error: --clutter:'), err
    assert not (tmp_path / 'x').exists()
    assert clutter_density('0:2') == (0.0, 2.0) and clutter_density('1.5') == 1.5


def test_a_density_range_is_drawn_per_scene():
    counts = {len(Scenario(ScenarioConfig(seed=5, vehicles=1, frames=1, traffic=QUICK, clutter=(0.0, 2.0)), n)
                  .world.boxes) for n in range(3)}
    assert len(counts) == 3
