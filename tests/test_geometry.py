import numpy as np
import pytest

from coop_perception import geometry as g


def test_quaternion_orders_round_trip():
    q_wxyz = np.array([0.9, 0.1, -0.2, 0.3])
    q_wxyz /= np.linalg.norm(q_wxyz)
    assert np.allclose(g.xyzw_to_wxyz(g.wxyz_to_xyzw(q_wxyz)), q_wxyz)
    assert np.allclose(g.wxyz_to_xyzw(q_wxyz), [q_wxyz[1], q_wxyz[2], q_wxyz[3], q_wxyz[0]])
    assert np.allclose(g.matrix_to_quat_wxyz(g.quat_wxyz_to_matrix(q_wxyz)), q_wxyz)


def test_yaw_quaternion():
    for yaw in (-3.0, -0.5, 0.0, 1.2, 3.1):
        assert g.quat_wxyz_to_yaw(g.yaw_to_quat_wxyz(yaw)) == pytest.approx(yaw)
    # 90 degrees about z: x axis -> y axis
    R = g.quat_wxyz_to_matrix(g.yaw_to_quat_wxyz(np.pi / 2))
    assert np.allclose(R @ [1, 0, 0], [0, 1, 0])


def test_pose_inverse_and_transform():
    T = g.make_pose([1.0, -2.0, 0.5], quat_wxyz=g.matrix_to_quat_wxyz(
        g.quat_wxyz_to_matrix(np.array([0.8, 0.2, 0.1, 0.5]) / np.linalg.norm([0.8, 0.2, 0.1, 0.5]))))
    assert np.allclose(g.invert_pose(T) @ T, np.eye(4))
    pts = np.array([[1.0, 2.0, 3.0, 7.0]], np.float32)
    back = g.transform_points(g.invert_pose(T), g.transform_points(T, pts))
    assert np.allclose(back, pts, atol=1e-5) and back[0, 3] == 7.0


def test_interpolate_pose_midpoint():
    T0 = g.make_pose([0, 0, 0], yaw=0.0)
    T1 = g.make_pose([2, 0, 0], yaw=1.0)
    Tm = g.interpolate_pose(T0, T1, 0.5)
    assert np.allclose(Tm[:3, 3], [1, 0, 0]) and g.matrix_yaw(Tm) == pytest.approx(0.5)
    assert g.matrix_yaw(g.interpolate_pose(T0, T1, 1.5)) == pytest.approx(1.5)


def test_bev_iou_of_boxes_with_themselves_equals_the_pairwise_form():
    rng = np.random.default_rng(0)
    boxes = np.concatenate([rng.uniform(-8, 8, (60, 3)), rng.uniform(0.5, 5, (60, 3)),
                            rng.uniform(-3, 3, (60, 1))], 1)
    boxes[7, 3] = 0.0   # no area: overlaps nothing, itself included
    pairwise = g.bev_iou(boxes, boxes.copy())
    assert (pairwise[~np.eye(60, dtype=bool)] > 0).sum() > 20
    np.testing.assert_allclose(g.bev_iou(boxes), pairwise, atol=1e-12)


def test_bev_iou_hand_cases():
    a = np.array([[0, 0, 0, 4, 2, 1.5, 0.3]])
    assert g.bev_iou(a, a)[0, 0] == pytest.approx(1.0)
    shifted = a.copy()
    shifted[0, :2] += 2 * np.array([np.cos(0.3), np.sin(0.3)])  # half a length along the heading
    assert g.bev_iou(a, shifted)[0, 0] == pytest.approx(1 / 3)
    far = a.copy()
    far[0, 0] += 10
    assert g.bev_iou(a, far)[0, 0] == 0.0
    # unit square vs the same square turned 45 degrees: a regular octagon of area 8 tan(pi/8)
    sq = np.array([[0, 0, 0, 2, 2, 1, 0.0]])
    rot = np.array([[0, 0, 0, 2, 2, 1, np.pi / 4]])
    inter = 8 * np.tan(np.pi / 8)
    assert g.bev_iou(sq, rot)[0, 0] == pytest.approx(inter / (8 - inter))
    # a small box fully inside a big one: IoU is the area ratio, whatever the yaw
    big = np.array([[0, 0, 0, 10, 10, 1, 0.2]])
    small = np.array([[1, 1, 0, 2, 1, 1, 1.0]])
    assert g.bev_iou(big, small)[0, 0] == pytest.approx(2 / 100)
    assert g.bev_iou(np.zeros((0, 7)), a).shape == (0, 1)


def test_bev_iou_is_symmetric_and_bounded():
    rng = np.random.default_rng(0)
    boxes = np.concatenate([rng.uniform(-5, 5, (40, 3)), rng.uniform(0.5, 5, (40, 3)),
                            rng.uniform(-np.pi, np.pi, (40, 1))], 1)
    iou = g.bev_iou(boxes, boxes)
    assert np.allclose(iou, iou.T, atol=1e-9)
    assert np.allclose(np.diag(iou), 1.0) and (iou >= 0).all() and (iou <= 1).all()


def test_corners_and_points_in_boxes():
    box = np.array([[1.0, 2.0, 1.0, 4.0, 2.0, 2.0, np.pi / 2]])
    corners = g.box_corners(box)[0]
    assert corners.shape == (8, 3)
    assert np.allclose(corners[:, 0].min(), 0.0) and np.allclose(corners[:, 1].max(), 4.0)
    pts = np.array([[1.0, 3.9, 1.0], [1.0, 4.1, 1.0], [1.9, 2.0, 0.1], [1.0, 2.0, 2.1]])
    assert g.points_in_boxes(pts, box)[0].tolist() == [True, False, True, False]


def test_transform_boxes_and_vectors():
    T = g.make_pose([10.0, 0.0, 0.0], yaw=np.pi / 2)
    boxes = np.array([[1.0, 0.0, 0.5, 4, 2, 1.5, 0.0]])
    out = g.transform_boxes(T, boxes)
    assert np.allclose(out[0, :3], [10.0, 1.0, 0.5]) and out[0, 6] == pytest.approx(np.pi / 2)
    assert np.allclose(g.rotate_vectors_2d(T, np.array([[1.0, 0.0]])), [[0.0, 1.0]])
