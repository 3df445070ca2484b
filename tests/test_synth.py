import numpy as np
import pytest

from coop_perception.data import roads
from coop_perception.data.synth import RSU_AGENT, Scenario, ScenarioConfig
from coop_perception.geometry import bev_iou, invert_pose, points_in_boxes, transform_boxes


@pytest.fixture(scope='module')
def scenario():
    return Scenario(ScenarioConfig(seed=3, vehicles=3, frames=6))


def test_agents_and_phases(scenario):
    assert scenario.agent_ids == [0, 1, 2, 3]
    frame = scenario.frame(0)
    stamps = {s.agent_id: s.timestamp_us for s in frame.scans}
    assert stamps[1] == frame.timestamp_us             # agent 1 captures at the reference time
    assert len(set(stamps.values())) == len(stamps)    # LiDARs are not phase-aligned
    assert all(frame.timestamp_us <= t < frame.timestamp_us + 100_000 for t in stamps.values())
    rsu = next(s for s in frame.scans if s.agent_id == RSU_AGENT)
    assert rsu.T_ego_sensor[2, 3] > 4.0                # elevated road-side LiDAR


def test_scan_characteristics(scenario):
    frame = scenario.frame(1)
    for scan in frame.scans:
        pts = scan.points
        assert pts.dtype == np.float32 and pts.shape[1] == 5
        assert len(pts) > 30000
        r = np.linalg.norm(pts[:, :3], axis=1)
        assert r.max() <= 70.5 and r.min() >= 0.9
        assert set(np.unique(pts[:, 4]).astype(int)) <= set(range(32))
        assert 0 <= pts[:, 3].min() and pts[:, 3].max() <= 255


def test_deterministic_from_seed():
    a = Scenario(ScenarioConfig(seed=11, vehicles=2, frames=2)).frame(1)
    b = Scenario(ScenarioConfig(seed=11, vehicles=2, frames=2)).frame(1)
    c = Scenario(ScenarioConfig(seed=12, vehicles=2, frames=2)).frame(1)
    assert all(np.array_equal(x.points, y.points) for x, y in zip(a.scans, b.scans))
    assert np.array_equal(a.boxes, b.boxes)
    assert not np.array_equal(a.scans[0].points, c.scans[0].points)


def test_ground_truth_classes_velocities_and_no_overlap(scenario):
    f0, f1 = scenario.frame(2), scenario.frame(3)
    cats = set(f0.categories)
    assert {'vehicle.car', 'human.pedestrian.adult'} <= cats
    assert cats & {'vehicle.truck', 'vehicle.bus.rigid', 'vehicle.van'}
    # velocities agree with the motion between frames
    common, i0, i1 = np.intersect1d(f0.instance_ids, f1.instance_ids, return_indices=True)
    dt = (f1.timestamp_us - f0.timestamp_us) * 1e-6
    moved = (f1.boxes[i1, :2] - f0.boxes[i0, :2]) / dt
    assert np.abs(moved - f0.velocities[i0]).max() < 1.0
    assert (np.linalg.norm(f0.velocities, axis=1) > 3).sum() >= 5  # real traffic moves
    iou = bev_iou(f0.boxes, f0.boxes)
    np.fill_diagonal(iou, 0)
    assert iou.max() < 0.05


def test_point_counts_match_points_in_boxes(scenario):
    frame = scenario.frame(0)
    scan = next(s for s in frame.scans if s.agent_id == 1)   # agent 1 sees the reference time
    boxes = transform_boxes(invert_pose(scan.T_world_ego @ scan.T_ego_sensor), frame.boxes)
    boxes[:, 3:6] += 0.2  # returns lie on the faces; range noise scatters them by a few cm
    inside = points_in_boxes(scan.points, boxes).sum(1)
    counts = frame.agent_points[1]
    seen = counts > 20
    assert seen.sum() >= 3
    # the box of each object encloses (almost) every point that hit it
    assert np.all(inside[seen] >= 0.95 * counts[seen])


def test_turning_routes_are_smooth():
    lay = roads.RoadLayout()
    for path in roads.all_vehicle_routes(lay):
        step = np.linalg.norm(np.diff(path.xy, axis=0), axis=1)
        assert step.max() <= roads.PATH_STEP + 1e-6
        assert np.abs(np.diff(np.unwrap(path.yaw))).max() < 0.2
    left = roads.vehicle_route(lay, 'E', 0, 'left')
    assert left.yaw[-1] == pytest.approx(np.pi / 2, abs=1e-3)
