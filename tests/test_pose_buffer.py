import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from coop_perception.fusion.pose_buffer import (NS_PER_S, BackJump, PoseBuffer, PoseBufferConfig, PoseBuffers,
                                               PoseLookupError)
from coop_perception.geometry import make_pose, matrix_yaw

MS = 1_000_000  # ns


def moving(t_ns: int) -> np.ndarray:
    """Ground truth: 20 m/s along x while turning at 1 rad/s (exact for interpolation in time)."""
    t = t_ns / NS_PER_S
    return make_pose([20.0 * t, 0.0, 0.0], yaw=1.0 * t)


def filled(stamps_ms, config=None) -> PoseBuffer:
    buf = PoseBuffer(config)
    for t in stamps_ms:
        buf.insert(t * MS, moving(t * MS))
    return buf


def test_midpoint_and_quarter_point():
    buf = PoseBuffer()
    buf.insert(0, make_pose([0, 0, 0], yaw=0.0))
    buf.insert(100 * MS, make_pose([2, 4, 0], yaw=1.0))
    mid = buf.lookup(50 * MS)
    assert np.allclose(mid[:3, 3], [1, 2, 0]) and matrix_yaw(mid) == pytest.approx(0.5)
    quarter = buf.lookup(25 * MS)
    assert np.allclose(quarter[:3, 3], [0.5, 1, 0]) and matrix_yaw(quarter) == pytest.approx(0.25)
    assert np.allclose(buf.lookup(100 * MS), make_pose([2, 4, 0], yaw=1.0))


def test_rotation_is_slerped_about_a_general_axis():
    axis = np.array([1.0, -2.0, 0.5]) / np.linalg.norm([1.0, -2.0, 0.5])
    r0 = Rotation.from_rotvec(0.2 * axis)
    r1 = Rotation.from_rotvec(1.4 * axis)
    buf = PoseBuffer()
    buf.insert(1_000 * MS, make_pose([0, 0, 0], r0.as_matrix()))
    buf.insert(1_200 * MS, make_pose([0, 0, 0], r1.as_matrix()))
    got = Rotation.from_matrix(buf.lookup(1_050 * MS)[:3, :3])
    assert np.allclose(got.as_rotvec(), 0.5 * axis)  # a quarter of the way: 0.2 + 0.25 * 1.2
    T = buf.lookup(1_100 * MS)
    assert np.allclose(T[:3, :3] @ T[:3, :3].T, np.eye(3)) and np.allclose(T[3], [0, 0, 0, 1])


def test_out_of_order_inserts_and_duplicates():
    shuffled = filled([300, 0, 200, 100, 400])
    assert shuffled.stamps_ns.tolist() == [0, 100 * MS, 200 * MS, 300 * MS, 400 * MS]
    ordered = filled([0, 100, 200, 300, 400])
    for t in (0, 37, 150, 399, 450):
        assert np.allclose(shuffled.lookup(t * MS), ordered.lookup(t * MS))
    assert np.allclose(shuffled.lookup(150 * MS), moving(150 * MS), atol=1e-9)
    shuffled.insert(200 * MS, make_pose([9, 9, 9]))
    assert len(shuffled) == 5 and np.allclose(shuffled.lookup(200 * MS)[:3, 3], [9, 9, 9])


def test_extrapolation_limit_and_reasons():
    buf = PoseBuffer(PoseBufferConfig(max_extrapolation_s=0.1))
    with pytest.raises(PoseLookupError) as e:
        buf.lookup(0)
    assert e.value.reason == PoseLookupError.EMPTY
    buf.insert(1_000 * MS, moving(1_000 * MS))
    # One pose: held constant within the limit.
    assert np.allclose(buf.lookup(1_080 * MS), moving(1_000 * MS))
    buf.insert(1_100 * MS, moving(1_100 * MS))
    ahead = buf.lookup(1_200 * MS)  # exactly at the limit: continued along the last two poses
    assert ahead[0, 3] == pytest.approx(24.0) and matrix_yaw(ahead) == pytest.approx(1.2)
    behind = buf.lookup(950 * MS)
    assert behind[0, 3] == pytest.approx(19.0) and matrix_yaw(behind) == pytest.approx(0.95)
    with pytest.raises(PoseLookupError) as e:
        buf.lookup(1_200 * MS + 1)
    assert e.value.reason == PoseLookupError.TOO_NEW and 'after the newest' in str(e.value)
    with pytest.raises(PoseLookupError) as e:
        buf.lookup(900 * MS - 1)
    assert e.value.reason == PoseLookupError.TOO_OLD and e.value.stamp_ns == 900 * MS - 1


def test_history_bounded_by_count_and_age():
    by_count = filled(range(0, 1000, 100), PoseBufferConfig(max_poses=4, max_age_s=None))
    assert by_count.stamps_ns.tolist() == [600 * MS, 700 * MS, 800 * MS, 900 * MS]
    by_age = filled(range(0, 5000, 100),
                    PoseBufferConfig(max_poses=None, max_age_s=1.0, time_jump_back_s=None))
    assert by_age.oldest_ns == 3900 * MS and by_age.newest_ns == 4900 * MS and len(by_age) == 11
    # An out-of-order pose already older than the kept window is not retained.
    by_age.insert(3500 * MS, moving(3500 * MS))
    assert by_age.oldest_ns == 3900 * MS


def test_clock_jump_back_clears_history():
    buf = filled([100_000, 100_100, 100_200], PoseBufferConfig(time_jump_back_s=1.0))
    assert not buf.insert(100_050 * MS, moving(100_050 * MS))  # late, not a jump
    assert len(buf) == 4
    assert buf.insert(500 * MS, moving(500 * MS))  # the bag looped
    assert buf.stamps_ns.tolist() == [500 * MS]
    assert not buf.maybe_reset_on_time_jump(0)
    assert buf.maybe_reset_on_time_jump(-600 * MS) and len(buf) == 0
    no_jumps = filled([100_000], PoseBufferConfig(time_jump_back_s=None, max_age_s=None))
    assert not no_jumps.insert(0, moving(0)) and len(no_jumps) == 2
    buf.insert(0, moving(0))
    buf.reset()
    assert len(buf) == 0 and buf.newest_ns is None


def test_bad_inputs_rejected():
    buf = PoseBuffer()
    with pytest.raises(TypeError, match='nanoseconds'):
        buf.insert(1.5, np.eye(4))
    with pytest.raises(TypeError):
        buf.lookup(0.1)
    with pytest.raises(ValueError):
        buf.insert(0, np.eye(3))
    bad = np.eye(4)
    bad[0, 3] = np.nan
    with pytest.raises(ValueError):
        buf.insert(0, bad)
    buf.insert(np.int64(7), np.eye(4))
    assert buf.stamps_ns.tolist() == [7]
    with pytest.raises(ValueError):
        PoseBufferConfig(max_poses=0)
    with pytest.raises(ValueError):
        PoseBufferConfig(max_extrapolation_s=-0.1)


def test_lookup_returns_a_copy():
    buf = filled([0])
    buf.lookup(0)[0, 3] = 99.0
    assert buf.lookup(0)[0, 3] == 0.0


def test_pose_buffers_per_agent():
    bufs = PoseBuffers(PoseBufferConfig(time_jump_back_s=1.0))
    bufs.insert(1, 10_000 * MS, make_pose([1, 0, 0]))
    bufs.insert('rsu', 10_000 * MS, make_pose([0, 5, 0]))
    assert 1 in bufs and 2 not in bufs and sorted(map(str, bufs.agents())) == ['1', 'rsu']
    assert np.allclose(bufs.lookup('rsu', 10_050 * MS)[:3, 3], [0, 5, 0])
    with pytest.raises(PoseLookupError) as e:
        bufs.lookup(2, 10_000 * MS)
    assert e.value.reason == PoseLookupError.EMPTY and '2' in str(e.value)
    bufs.insert(1, 12_000 * MS, make_pose([1, 0, 0]))
    assert bufs.maybe_reset_on_time_jump(10_500 * MS) == [1]
    assert len(bufs[1]) == 0 and len(bufs['rsu']) == 1
    bufs.reset()
    assert len(bufs['rsu']) == 0


def test_a_jump_back_needs_consecutive_consistent_poses_to_clear_the_history():
    buf = filled([100_000, 100_100, 100_200], PoseBufferConfig(time_jump_back_s=1.0, jump_confirm=3))
    assert not buf.insert(5_000 * MS, moving(5_000 * MS))        # one stale pose: held back
    assert not buf.insert(100_300 * MS, moving(100_300 * MS))    # the current time goes on
    assert not buf.insert(500 * MS, moving(500 * MS))
    assert not buf.insert(9_000 * MS, moving(9_000 * MS))        # stale too, but not near the last one
    assert len(buf) == 4 and buf.newest_ns == 100_300 * MS and buf.stale == 3
    assert not buf.insert(9_100 * MS, moving(9_100 * MS))
    assert buf.insert(9_200 * MS, moving(9_200 * MS))            # the third in a row: the bag looped
    assert buf.stamps_ns.tolist() == [9_000 * MS, 9_100 * MS, 9_200 * MS]
    assert np.allclose(buf.lookup(9_050 * MS), moving(9_050 * MS))
    with pytest.raises(ValueError, match='jump_confirm'):
        PoseBufferConfig(jump_confirm=0)


def test_back_jump_holds_items_until_confirmed():
    clock = BackJump(jump_ns=500, confirm=2)
    assert clock.observe(10_000, 'a') == (BackJump.OK, [])
    assert clock.observe(9_600, 'late') == (BackJump.OK, []) and clock.newest_ns == 10_000
    assert clock.observe(100, 'b') == (BackJump.STALE, []) and clock.held() == ['b']
    assert clock.observe(200, 'c') == (BackJump.JUMP, ['b', 'c']) and clock.newest_ns == 200
    assert clock.stale == 1 and BackJump(None).observe(-10**12)[0] == BackJump.OK


def test_pose_buffers_forget_an_agent():
    bufs = PoseBuffers()
    bufs.insert(1, 0, np.eye(4))
    bufs.insert(2, 0, np.eye(4))
    bufs.forget(2)
    bufs.forget(3)
    assert len(bufs) == 1 and 2 not in bufs
