"""Record live topics into a rosbag2 bag from inside a process that does other work.

Like ``ros2 bag record`` (which these machines lack): messages are written as the CDR bytes DDS
delivers (no deserialisation), logged at the recorder's ROS time of receipt, i.e. bag time when
``use_sim_time`` follows a player's ``/clock``. The recorder spins its own rclpy context on a
background thread, so it neither needs nor disturbs a global ``rclpy.init``.
"""
from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import rclpy
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.parameter import Parameter

from coop_perception.data.bag import RELIABLE_QOS as BAG_RELIABLE_QOS
from coop_perception.data.bag import BagWriter
from coop_perception.ros import convert as cv
from coop_perception.ros.env import use_local_discovery
from coop_perception.ros.node import RELIABLE_QOS

NODE_NAME = 'coop_recorder'


class BagRecorder:
    """Records ``topics`` (topic -> message type, e.g. ``sensor_msgs/msg/PointCloud2``) into a new
    bag at ``out`` between :meth:`start` and :meth:`stop`. Subscriptions are reliable (what the
    package's nodes offer for their outputs) and recorded with reliable QoS."""

    def __init__(self, out, topics: dict[str, str], *, storage: str = 'mcap', use_sim_time: bool = True,
                 domain_id: int | None = None):
        self.out = Path(out)
        self.topics = dict(topics)
        self.storage = storage
        self.use_sim_time = use_sim_time
        self.domain_id = domain_id
        self.counts: Counter = Counter()
        self._lock = threading.Lock()
        self._writer = self._context = self._node = self._executor = self._thread = None

    def start(self) -> 'BagRecorder':
        use_local_discovery()
        self._writer = BagWriter(self.out, self.storage).open()
        self._context = rclpy.Context()
        rclpy.init(context=self._context, **({} if self.domain_id is None else {'domain_id': self.domain_id}))
        self._node = rclpy.create_node(NODE_NAME, context=self._context, parameter_overrides=[
            Parameter('use_sim_time', value=self.use_sim_time)])
        msgs = cv.RclpyMessages()
        for topic, msgtype in self.topics.items():
            self._node.create_subscription(msgs.get_class(msgtype), topic,
                                           lambda raw, t=topic, m=msgtype: self._write(t, m, raw),
                                           RELIABLE_QOS, raw=True)
        self._executor = SingleThreadedExecutor(context=self._context)
        self._executor.add_node(self._node)
        self._thread = threading.Thread(target=self._spin, name=NODE_NAME, daemon=True)
        self._thread.start()
        return self

    def _spin(self) -> None:
        try:
            self._executor.spin()
        except ExternalShutdownException:
            pass

    def _write(self, topic: str, msgtype: str, raw: bytes) -> None:
        with self._lock:
            if self._writer is None:  # a callback that raced stop()
                return
            self._writer.write_raw(topic, msgtype, BAG_RELIABLE_QOS, self._node.get_clock().now().nanoseconds,
                                   bytes(raw))
            self.counts[topic] += 1

    def stop(self) -> dict[str, int]:
        """Stop listening and close the bag; returns messages recorded per topic."""
        if self._executor is not None:
            self._executor.shutdown()
            self._thread.join(5.0)
            self._node.destroy_node()
            rclpy.try_shutdown(context=self._context)
        with self._lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        self._executor = None
        return dict(self.counts)

    def __enter__(self) -> 'BagRecorder':
        return self.start()

    def __exit__(self, *_):
        self.stop()
