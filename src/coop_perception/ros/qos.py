"""Recorded QoS (rosbags ``Qos`` from bag metadata) -> rclpy ``QoSProfile``."""
from __future__ import annotations

from typing import Sequence

from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rosbags.interfaces import QosDurability, QosHistory, QosReliability

# When a bag records nothing: what rosbag2 plays such topics with.
DEFAULT_DEPTH = 10

_HISTORY = {QosHistory.KEEP_LAST: HistoryPolicy.KEEP_LAST, QosHistory.KEEP_ALL: HistoryPolicy.KEEP_ALL}


def playback_qos(offered: Sequence) -> QoSProfile:
    """One publisher profile that every subscriber of the recorded publishers can match.

    Several recorded publishers may have offered different profiles: best effort wins unless all
    were reliable, transient local only if all were (like rosbag2's player). Deadline, lifespan and
    liveliness are left at their defaults: they do not change which subscribers match or what they
    receive during a replay.
    """
    if not offered:
        return QoSProfile(depth=DEFAULT_DEPTH, reliability=ReliabilityPolicy.RELIABLE,
                          durability=DurabilityPolicy.VOLATILE)
    reliable = all(q.reliability == QosReliability.RELIABLE for q in offered)
    latched = all(q.durability == QosDurability.TRANSIENT_LOCAL for q in offered)
    history = _HISTORY.get(offered[0].history, HistoryPolicy.KEEP_LAST)
    depth = max(max(int(q.depth) for q in offered), 1)
    return QoSProfile(history=history, depth=depth,
                      reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT,
                      durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE)


# /clock: only the newest value matters (depth 1). Reliable, unlike rosbag2's best effort, so that
# subscribers asking for either reliability match (the ROS time sources ask for best effort).
CLOCK_QOS = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                       durability=DurabilityPolicy.VOLATILE)
