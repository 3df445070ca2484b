"""Poses, quaternions and 3D boxes.

Conventions used across the package:

* Poses are 4x4 homogeneous float64 matrices ``T_a_b`` mapping points in frame ``b`` to frame ``a``.
* Quaternions are converted in exactly one place (here): nuScenes stores ``[w, x, y, z]``,
  ROS messages carry ``[x, y, z, w]``.
* Boxes are ``(N, 7)`` arrays ``[x, y, z, l, w, h, yaw]``: centre in metres, length along the
  heading, width, height, and yaw in radians about +z (counter-clockwise from +x).
"""
from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation, Slerp

BOX_DIM = 7


# --------------------------------------------------------------------------- quaternions / poses
def wxyz_to_xyzw(q: np.ndarray) -> np.ndarray:
    """(..., 4) nuScenes quaternion -> ROS order."""
    q = np.asarray(q, dtype=np.float64)
    return np.concatenate([q[..., 1:4], q[..., :1]], axis=-1)


def xyzw_to_wxyz(q: np.ndarray) -> np.ndarray:
    """(..., 4) ROS quaternion -> nuScenes order."""
    q = np.asarray(q, dtype=np.float64)
    return np.concatenate([q[..., 3:4], q[..., :3]], axis=-1)


def quat_wxyz_to_matrix(q: np.ndarray) -> np.ndarray:
    """(..., 4) [w, x, y, z] -> (..., 3, 3) rotation matrix."""
    return Rotation.from_quat(wxyz_to_xyzw(q)).as_matrix()


def matrix_to_quat_wxyz(rot: np.ndarray) -> np.ndarray:
    """(..., 3, 3) rotation -> (..., 4) [w, x, y, z] with w >= 0."""
    q = xyzw_to_wxyz(Rotation.from_matrix(rot).as_quat())
    return np.where(q[..., :1] < 0, -q, q)


def yaw_to_quat_wxyz(yaw: np.ndarray) -> np.ndarray:
    """(...,) yaw about +z (rad) -> (..., 4) [w, x, y, z]."""
    yaw = np.asarray(yaw, dtype=np.float64)
    return np.stack([np.cos(yaw / 2), np.zeros_like(yaw), np.zeros_like(yaw), np.sin(yaw / 2)], -1)


def quat_wxyz_to_yaw(q: np.ndarray) -> np.ndarray:
    """(..., 4) [w, x, y, z] -> (...,) yaw of the rotated +x axis projected on the ground (rad)."""
    return matrix_yaw(quat_wxyz_to_matrix(q))


def matrix_yaw(rot: np.ndarray) -> np.ndarray:
    """(..., 3+, 3+) rotation or pose -> yaw of its x axis in the ground plane (rad)."""
    rot = np.asarray(rot)
    return np.arctan2(rot[..., 1, 0], rot[..., 0, 0])


def make_pose(translation: np.ndarray, rotation: np.ndarray | None = None, *,
              quat_wxyz: np.ndarray | None = None, yaw: float | None = None) -> np.ndarray:
    """Build a 4x4 pose from a translation (3,) and one of: a 3x3 rotation, a quaternion, a yaw."""
    T = np.eye(4)
    if rotation is not None:
        T[:3, :3] = rotation
    elif quat_wxyz is not None:
        T[:3, :3] = quat_wxyz_to_matrix(quat_wxyz)
    elif yaw is not None:
        c, s = np.cos(yaw), np.sin(yaw)
        T[:2, :2] = [[c, -s], [s, c]]
    T[:3, 3] = translation
    return T


def invert_pose(T: np.ndarray) -> np.ndarray:
    """Inverse of a (..., 4, 4) rigid transform without a general matrix inverse."""
    T = np.asarray(T, dtype=np.float64)
    out = np.zeros_like(T)
    rt = np.swapaxes(T[..., :3, :3], -1, -2)
    out[..., :3, :3] = rt
    out[..., :3, 3] = -np.einsum('...ij,...j->...i', rt, T[..., :3, 3])
    out[..., 3, 3] = 1.0
    return out


def transform_points(T: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 pose to (N, 3+) points; extra columns (intensity, ...) pass through."""
    points = np.asarray(points)
    out = points.copy()
    xyz = points[:, :3].astype(np.float64) @ T[:3, :3].T + T[:3, 3]
    out[:, :3] = xyz.astype(points.dtype, copy=False)
    return out


def interpolate_pose(T0: np.ndarray, T1: np.ndarray, alpha: float) -> np.ndarray:
    """SE(3) interpolation: slerp of rotation, lerp of translation; alpha in [0, 1] (or beyond)."""
    rots = Rotation.from_matrix(np.stack([T0[:3, :3], T1[:3, :3]]))
    T = np.eye(4)
    if 0.0 <= alpha <= 1.0:
        T[:3, :3] = Slerp([0.0, 1.0], rots)([alpha]).as_matrix()[0]
    else:
        delta = (rots[0].inv() * rots[1]).as_rotvec()
        T[:3, :3] = (rots[0] * Rotation.from_rotvec(alpha * delta)).as_matrix()
    T[:3, 3] = (1.0 - alpha) * T0[:3, 3] + alpha * T1[:3, 3]
    return T


# --------------------------------------------------------------------------- boxes
def wrap_angle(a: np.ndarray) -> np.ndarray:
    """Wrap angles to [-pi, pi)."""
    return (np.asarray(a) + np.pi) % (2 * np.pi) - np.pi


def transform_boxes(T: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Express (N, 7+) boxes given in frame b in frame a (``T = T_a_b``); yaw follows the rotation."""
    boxes = np.asarray(boxes, dtype=np.float64)
    out = boxes.copy()
    out[:, :3] = boxes[:, :3] @ T[:3, :3].T + T[:3, 3]
    out[:, 6] = wrap_angle(boxes[:, 6] + matrix_yaw(T))
    return out


def rotate_vectors_2d(T: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Rotate (N, 2) ground-plane vectors (e.g. velocities) by the yaw of pose T."""
    yaw = matrix_yaw(T)
    c, s = np.cos(yaw), np.sin(yaw)
    v = np.asarray(v, dtype=np.float64)
    return np.stack([c * v[:, 0] - s * v[:, 1], s * v[:, 0] + c * v[:, 1]], axis=-1)


def bev_corners(boxes: np.ndarray) -> np.ndarray:
    """(N, 7) boxes -> (N, 4, 2) BEV corners, counter-clockwise, starting front-left."""
    boxes = np.asarray(boxes, dtype=np.float64)
    hl, hw = boxes[:, 3] / 2, boxes[:, 4] / 2
    local = np.stack([np.stack([hl, hw], -1), np.stack([-hl, hw], -1),
                      np.stack([-hl, -hw], -1), np.stack([hl, -hw], -1)], axis=1)
    c, s = np.cos(boxes[:, 6]), np.sin(boxes[:, 6])
    rot = np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], axis=1)  # (N, 2, 2)
    return np.einsum('nij,nkj->nki', rot, local) + boxes[:, None, :2]


def box_corners(boxes: np.ndarray) -> np.ndarray:
    """(N, 7) boxes -> (N, 8, 3) corners: bottom face (ccw from front-left) then top face."""
    boxes = np.asarray(boxes, dtype=np.float64)
    bev = bev_corners(boxes)
    zb = (boxes[:, 2] - boxes[:, 5] / 2)[:, None, None]
    zt = (boxes[:, 2] + boxes[:, 5] / 2)[:, None, None]
    bottom = np.concatenate([bev, np.broadcast_to(zb, bev.shape[:2] + (1,))], -1)
    top = np.concatenate([bev, np.broadcast_to(zt, bev.shape[:2] + (1,))], -1)
    return np.concatenate([bottom, top], axis=1)


def points_in_boxes(points: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(M, 3+) points, (N, 7) boxes -> (N, M) bool, True where point m lies inside box n."""
    points = np.asarray(points, dtype=np.float64)[:, :3]
    boxes = np.asarray(boxes, dtype=np.float64)
    d = points[None, :, :] - boxes[:, None, :3]
    c, s = np.cos(boxes[:, 6])[:, None], np.sin(boxes[:, 6])[:, None]
    lx = c * d[..., 0] + s * d[..., 1]
    ly = -s * d[..., 0] + c * d[..., 1]
    return ((np.abs(lx) <= boxes[:, 3:4] / 2) & (np.abs(ly) <= boxes[:, 4:5] / 2)
            & (np.abs(d[..., 2]) <= boxes[:, 5:6] / 2))


def count_points_in_boxes(points: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(M, 3+) points, (N, 7) boxes -> (N,) int64: points inside each box (a point in two boxes
    counts for both). Unlike `points_in_boxes` it never builds the N x M table: a k-d tree over the
    points' x, y gives the candidates within each box's bounding circle, which are tested exactly."""
    points = np.asarray(points, dtype=np.float64)[:, :3]
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, BOX_DIM)
    counts = np.zeros(len(boxes), np.int64)
    if len(points) == 0 or len(boxes) == 0:
        return counts
    from scipy.spatial import cKDTree

    near = cKDTree(points[:, :2]).query_ball_point(boxes[:, :2], 0.5 * np.hypot(boxes[:, 3], boxes[:, 4]))
    sizes = np.fromiter((len(c) for c in near), np.int64, len(boxes))
    if not sizes.sum():
        return counts
    box = np.repeat(np.arange(len(boxes)), sizes)
    d = points[np.concatenate([c for c in near if c])] - boxes[box, :3]
    c, s = np.cos(boxes[box, 6]), np.sin(boxes[box, 6])
    inside = ((np.abs(c * d[:, 0] + s * d[:, 1]) <= boxes[box, 3] / 2)
              & (np.abs(-s * d[:, 0] + c * d[:, 1]) <= boxes[box, 4] / 2)
              & (np.abs(d[:, 2]) <= boxes[box, 5] / 2))
    return np.bincount(box[inside], minlength=len(boxes)).astype(np.int64)


def _polygon_intersection_area(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Areas of the intersections of convex ccw quads a[i] and b[i]; a, b: (P, 4, 2) -> (P,).

    The intersection polygon's vertices are the corners of each quad inside the other plus the
    edge-edge crossings; sorted by angle around their mean they form a convex polygon whose area
    the shoelace formula gives. Invalid candidates are replaced by the first valid vertex after
    sorting, which adds zero-area terms.
    """
    P = a.shape[0]
    if P == 0:
        return np.zeros(0)

    def inside(pts, quad):  # pts (P, K, 2) inside quad (P, 4, 2) -> (P, K)
        e0 = quad[:, None, :, :]
        e1 = np.roll(quad, -1, axis=1)[:, None, :, :]
        cross = ((e1[..., 0] - e0[..., 0]) * (pts[:, :, None, 1] - e0[..., 1])
                 - (e1[..., 1] - e0[..., 1]) * (pts[:, :, None, 0] - e0[..., 0]))
        return np.all(cross >= -1e-9, axis=-1)

    a_in_b = inside(a, b)
    b_in_a = inside(b, a)
    # Edge crossings: every edge of a against every edge of b -> (P, 4, 4).
    p, r = a[:, :, None, :], (np.roll(a, -1, 1) - a)[:, :, None, :]
    q, s = b[:, None, :, :], (np.roll(b, -1, 1) - b)[:, None, :, :]
    rxs = r[..., 0] * s[..., 1] - r[..., 1] * s[..., 0]
    qp = q - p
    with np.errstate(divide='ignore', invalid='ignore'):
        t = (qp[..., 0] * s[..., 1] - qp[..., 1] * s[..., 0]) / rxs
        u = (qp[..., 0] * r[..., 1] - qp[..., 1] * r[..., 0]) / rxs
    cross_ok = (np.abs(rxs) > 1e-12) & (t >= 0) & (t <= 1) & (u >= 0) & (u <= 1)
    cross_pts = p + np.where(np.isfinite(t), t, 0.0)[..., None] * r

    cand = np.concatenate([a, b, cross_pts.reshape(P, 16, 2)], axis=1)  # (P, 24, 2)
    valid = np.concatenate([a_in_b, b_in_a, cross_ok.reshape(P, 16)], axis=1)
    n_valid = valid.sum(1)
    centre = (cand * valid[..., None]).sum(1) / np.maximum(n_valid, 1)[:, None]
    ang = np.arctan2(cand[..., 1] - centre[:, None, 1], cand[..., 0] - centre[:, None, 0])
    ang = np.where(valid, ang, np.inf)
    order = np.argsort(ang, axis=1)
    pts = np.take_along_axis(cand, order[..., None], axis=1)
    ok = np.take_along_axis(valid, order, axis=1)
    pts = np.where(ok[..., None], pts, pts[:, :1, :])
    nxt = np.roll(pts, -1, axis=1)
    area = 0.5 * np.abs((pts[..., 0] * nxt[..., 1] - nxt[..., 0] * pts[..., 1]).sum(1))
    return np.where(n_valid >= 3, area, 0.0)


def bev_iou(boxes_a: np.ndarray, boxes_b: np.ndarray | None = None) -> np.ndarray:
    """Rotated bird's-eye-view IoU of every pair: (N, 7), (M, 7) -> (N, M) in [0, 1]. Without
    ``boxes_b``, of ``boxes_a`` with themselves (N, N): each pair is computed once and mirrored."""
    symmetric = boxes_b is None
    boxes_a = np.asarray(boxes_a, dtype=np.float64).reshape(-1, BOX_DIM)
    boxes_b = boxes_a if symmetric else np.asarray(boxes_b, dtype=np.float64).reshape(-1, BOX_DIM)
    N, M = len(boxes_a), len(boxes_b)
    iou = np.zeros((N, M))
    if N == 0 or M == 0:
        return iou
    # Only pairs whose bounding circles overlap can intersect; skip the rest cheaply.
    ra = 0.5 * np.hypot(boxes_a[:, 3], boxes_a[:, 4])
    rb = 0.5 * np.hypot(boxes_b[:, 3], boxes_b[:, 4])
    dist = np.linalg.norm(boxes_a[:, None, :2] - boxes_b[None, :, :2], axis=-1)
    near = dist < ra[:, None] + rb[None, :]
    ia, ib = np.nonzero(np.triu(near, 1) if symmetric else near)
    area_a = boxes_a[:, 3] * boxes_a[:, 4]
    area_b = boxes_b[:, 3] * boxes_b[:, 4]
    if len(ia):
        inter = _polygon_intersection_area(bev_corners(boxes_a)[ia], bev_corners(boxes_b)[ib])
        union = area_a[ia] + area_b[ib] - inter
        iou[ia, ib] = np.clip(inter / np.maximum(union, 1e-9), 0.0, 1.0)
    if symmetric:
        iou[ib, ia] = iou[ia, ib]
        iou[np.diag_indices(N)] = (area_a > 0).astype(np.float64)
    return iou
