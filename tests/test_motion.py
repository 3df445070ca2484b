import numpy as np

from coop_perception.fusion.motion import VelocityTracker, VelocityTrackerConfig
from coop_perception.geometry import invert_pose, make_pose, transform_boxes

MS = 1_000_000


def boxes_world(t):
    """A car driving +x at 10 m/s, a parked car, a pedestrian walking +y at 1.5 m/s (world)."""
    return np.array([[10.0 * t, 0.0, 0.8, 4.5, 1.9, 1.6, 0.0],
                     [5.0, 8.0, 0.8, 4.4, 1.8, 1.5, 0.0],
                     [-3.0, 1.5 * t, 0.9, 0.6, 0.6, 1.7, 0.0]])


LABELS = np.array([0, 0, 2])


def test_tracked_velocities_in_the_sensor_frame_of_a_moving_turning_sensor():
    tracker = VelocityTracker()
    for step in range(8):
        t = 0.1 * step
        sensor = make_pose([8.0 * t, -6.0, 1.8], yaw=0.3 + 0.2 * t)   # the sender drives and turns
        local = transform_boxes(invert_pose(sensor), boxes_world(t))
        order = np.array([2, 0, 1]) if step % 2 else np.arange(3)     # detection order does not matter
        vel, _ = tracker.update(local[order], LABELS[order], sensor, int(t * 1000 * MS))
        if step == 0:
            assert np.all(vel == 0)                                   # nothing to estimate from yet
    yaw = 0.3 + 0.2 * 0.7
    expect_world = np.array([[10.0, 0.0], [0.0, 0.0], [0.0, 1.5]])[order]
    c, s = np.cos(-yaw), np.sin(-yaw)
    expect = expect_world @ np.array([[c, s], [-s, c]])
    assert np.allclose(vel, expect, atol=0.05)


def test_the_filter_averages_out_centre_noise():
    """Detected centres with 15 cm noise: frame-to-frame differences are off by ~2 m/s, the
    filtered velocity of a track a second old by a fraction of that."""
    rng = np.random.default_rng(0)
    tracker, errors, raw = VelocityTracker(), [], []
    previous = None
    for step in range(30):
        t = 0.1 * step
        boxes = boxes_world(t)
        boxes[:, :2] += rng.normal(0, 0.15, (3, 2))
        vel, _ = tracker.update(boxes, LABELS, np.eye(4), int(t * 1000 * MS))
        if step >= 10:
            errors.append(np.linalg.norm(vel[0] - [10.0, 0.0]))
            raw.append(np.linalg.norm((boxes[0, :2] - previous[0, :2]) / 0.1 - [10.0, 0.0]))
        previous = boxes
    assert np.median(raw) > 1.5 and np.median(errors) < np.median(raw) / 3


def test_class_gate_speed_gate_and_time_going_back():
    tracker = VelocityTracker()
    I = np.eye(4)
    tracker.update(boxes_world(0.0), LABELS, I, 0)
    swapped = LABELS.copy()
    swapped[2] = 3                                                    # a cyclist now: no match
    vel, _ = tracker.update(boxes_world(0.1), swapped, I, 100 * MS)
    assert np.allclose(vel[0], [10, 0], atol=0.5) and np.all(vel[2] == 0)
    far = boxes_world(0.2)
    far[0, 0] += 20.0                                                 # 200 m/s would be needed
    assert np.all(tracker.update(far, LABELS, I, 200 * MS)[0][0] == 0)
    assert np.all(tracker.update(boxes_world(0.0), LABELS, I, 0)[0] == 0)   # bag loop: start over
    assert np.allclose(tracker.update(boxes_world(0.1), LABELS, I, 100 * MS)[0][0], [10, 0], atol=0.5)


def test_a_parked_car_stands_still_despite_centre_jitter():
    """A parked car's detected centre jitters by 15 cm: unfiltered, its young track would report
    1-2 m/s; the moving gate reports 0 unless the velocity stands out from its uncertainty."""
    rng = np.random.default_rng(1)
    gated, ungated = VelocityTracker(), VelocityTracker(VelocityTrackerConfig(moving_gate=0.0))
    reported, raw = [], []
    for step in range(20):
        t = 0.1 * step
        boxes = boxes_world(t)
        boxes[:, :2] += rng.normal(0, 0.15, (3, 2))
        vel, _ = gated.update(boxes, LABELS, np.eye(4), int(t * 1000 * MS))
        reported.append(np.linalg.norm(vel[1]))
        raw.append(np.linalg.norm(ungated.update(boxes, LABELS, np.eye(4), int(t * 1000 * MS))[0][1]))
        if step >= 2:
            assert np.linalg.norm(vel[0] - [10.0, 0.0]) < 3.0          # the driving car is reported
    assert np.mean(reported) < 0.5 * np.mean(raw) and np.median(reported) == 0.0


def test_measured_velocities_move_a_track_from_its_first_scan():
    """A multi-sweep detector's velocities (0.3 m/s noise) are measurements: a new track reports
    them at once, in the sensor frame of a turned sensor; a parked car's stay gated at 0."""
    rng = np.random.default_rng(1)
    sensor = make_pose([2.0, -6.0, 1.8], yaw=0.4)
    local = transform_boxes(invert_pose(sensor), boxes_world(0.0))
    true_world = np.array([[10.0, 0.0], [0.0, 0.0], [0.0, 1.5]])
    c, s = np.cos(-0.4), np.sin(-0.4)
    true_local = true_world @ np.array([[c, s], [-s, c]])
    measured = true_local + rng.normal(0, 0.1, (3, 2))
    tracker = VelocityTracker()
    vel, _ = tracker.update(local, LABELS, sensor, 0, measured, velocity_std=0.3)
    assert np.allclose(vel[0], measured[0]) and np.allclose(vel[2], measured[2])
    assert np.all(vel[1] == 0)
    # with velocity_std 0 the same call ignores them, as for a one-sweep detector
    assert np.all(VelocityTracker().update(local, LABELS, sensor, 0, measured, velocity_std=0.0)[0] == 0)
