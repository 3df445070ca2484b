"""Ground-truth database sampling: objects cut from one scan, pasted into another at their own place
relative to the sensor, on the new sensor's ground, never overlapping, the scan cleared under them."""
import numpy as np
import pytest

from coop_perception.detection.config import with_overrides
from coop_perception.detection.gt_database import GroundTruthDatabase, build_database, grown, paste_objects
from coop_perception.detection.train import GT_DATABASE, TrainExample, prepare_batch, train
from coop_perception.geometry import points_in_boxes
from test_detection_train import CFG, SENSOR_H, small_train_config, toy_scene


def test_database_holds_objects_with_enough_returns_heights_above_ground():
    ex = toy_scene(np.random.default_rng(0))
    sparse = TrainExample(ex.points, np.concatenate([ex.boxes, [[30.0, 30.0, -1.0, 4.0, 2.0, 1.5, 0.0]]]),
                          np.array([0, 0, 2, 0]), np.zeros((4, 2)), SENSOR_H)   # a car with no returns
    db = build_database([sparse], CFG.voxel, min_points=5, progress=False)
    assert len(db) == 3 and db.labels.tolist() == [0, 0, 2]
    np.testing.assert_allclose(db.boxes[:, 2], ex.boxes[:, 2] + SENSOR_H)
    for i in range(len(db)):
        pts = db.object_points(i)
        assert len(pts) >= 400 and pts.shape[1] == 4 and pts.dtype == np.float32
        assert pts[:, 2].min() >= -0.2   # no ground returns below the box: heights above the ground


def test_database_survives_a_round_trip(tmp_path):
    db = build_database([toy_scene(np.random.default_rng(0))], CFG.voxel, min_points=5, progress=False)
    back = GroundTruthDatabase.load(db.save(tmp_path / 'db.npz'))
    for name in ('boxes', 'labels', 'velocities', 'points', 'offsets'):
        np.testing.assert_array_equal(getattr(back, name), getattr(db, name))


def test_pasted_objects_land_on_the_new_ground_clear_of_every_box():
    source = toy_scene(np.random.default_rng(0))
    db = build_database([source], CFG.voxel, min_points=5, progress=False)
    # the target scan: a denser ground 2.2 m below its sensor, one car where the source's first car was
    rng = np.random.default_rng(1)
    n, h = 20000, 2.2
    ground = np.stack([rng.uniform(-40, 40, n), rng.uniform(-40, 40, n), rng.normal(-h, 0.02, n),
                       np.ones(n)], 1).astype(np.float32)   # intensity 1: this scan's own returns
    blocker = np.array([[10.0, 3.0, -1.4, 4.5, 1.9, 1.6, 0.4]])
    ages = np.zeros(n, np.float32)
    pts, out_ages, boxes, labels, vel = paste_objects(ground, ages, blocker, np.array([0]), np.zeros((1, 2)), h,
                                                      db, (5, 0, 5, 0), np.random.default_rng(2))
    # the source's first car would overlap the blocker: only the second car and the pedestrian come
    assert len(boxes) == 3 and sorted(labels.tolist()) == [0, 0, 2]
    np.testing.assert_allclose(np.sort(boxes[1:, 0]), np.sort(source.boxes[1:, 0]))
    for box in boxes[1:]:   # as high above the new ground as above the old one
        assert box[2] + h == pytest.approx(db.boxes[np.argmin(np.abs(db.boxes[:, 0] - box[0])), 2])
    assert len(out_ages) == len(pts) and (out_ages == 0).all()
    inside = points_in_boxes(pts, grown(boxes[1:])).any(0)   # surface returns lie on the box faces
    assert inside.sum() >= 800   # the pasted objects' own returns
    # the scan's ground under the pasted boxes is gone, their points sit on the new ground
    assert (pts[inside, 3] == 0).all() and (pts[~inside, 3] == 1).all()
    assert pts[inside, 2].min() >= -h - 0.2
    assert np.allclose(vel[0], 0) and len(vel) == 3


def test_nothing_pasted_without_counts_or_room():
    ex = toy_scene(np.random.default_rng(0))
    db = build_database([ex], CFG.voxel, min_points=5, progress=False)
    same = paste_objects(ex.points, None, ex.boxes, ex.labels, ex.velocities, SENSOR_H, db, (0, 0, 0, 0),
                         np.random.default_rng(0))
    assert same[0] is ex.points and same[2] is ex.boxes
    # every database object lies where the scan already has one: all rejected
    full = paste_objects(ex.points, None, ex.boxes, ex.labels, ex.velocities, SENSOR_H, db, (9, 9, 9, 9),
                         np.random.default_rng(0))
    assert len(full[2]) == 3 and len(full[0]) == len(ex.points)


def test_training_pastes_objects_and_keeps_its_database(tmp_path):
    cfg = with_overrides(small_train_config(iterations=2), train={'augment': {'gt_sampling': [2, 0, 1, 0]}})
    scenes = [toy_scene(np.random.default_rng(0)), TrainExample(*toy_scene(np.random.default_rng(1)))]
    moved = scenes[1]._replace(boxes=scenes[1].boxes + [0, 15, 0, 0, 0, 0, 0],
                               points=scenes[1].points + np.array([0, 15, 0, 0], np.float32))
    db = build_database([moved], cfg.voxel, min_points=5, progress=False)
    plain = prepare_batch([scenes[0]], cfg, np.random.default_rng(0))
    pasted = prepare_batch([scenes[0]], cfg, np.random.default_rng(0), db)
    assert plain.targets.mask.sum() == 3 and pasted.targets.mask.sum() == 6
    train(cfg, [scenes[0], moved], tmp_path, progress=False)
    assert len(GroundTruthDatabase.load(tmp_path / GT_DATABASE)) == 6


def test_gt_sampling_needs_one_count_per_class():
    from coop_perception.errors import UserError

    with pytest.raises(UserError, match='gt_sampling'):
        with_overrides(CFG, train={'augment': {'gt_sampling': [1, 2]}})
