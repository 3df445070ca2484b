"""Scores a recorded live run (``ros.live_run``) against the dataset it was replayed from, with
the AP convention, ground truth and range of ``coop-perception eval fusion``.

Every ego frame of the scene counts: a frame for which the run published nothing is scored as a
frame without detections (its ground truth is missed), so dropped frames lower the live AP.

End-to-end latency is taken from the recording: the recorder logs each message at its ROS time
of receipt, so log time minus header stamp is scan capture -> output delivered, in ROS time.
(A node's own clock reading is no substitute under sim time: its /clock subscription waits in the
same executor as the callback that does the work, so the clock it reads at publication is the one
from before the work began.) A recording logged at wall-clock time instead (``ros.per_vehicle``'s
real-time run) is mapped to bag time with ``WallToBag``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from ..data import ros_msgs
from ..data.bag import BagReader
from ..data.ground_truth import cooperative_targets
from ..data.objects import OBJECT_DTYPE, object_boxes
from .ap import HEADLINE_CLASS, APAccumulator


@dataclass
class ReplayFrame:
    """One ego frame of the replay, everything in the ego sensor frame at its capture time."""
    index: int                          # frame of the scene
    stamp_ns: int                       # the ego's capture stamp
    gt_boxes: np.ndarray                # (M, 7) cooperative ground truth
    gt_labels: np.ndarray               # (M,)
    fused: np.ndarray | None            # data.objects records on /coop/objects; None: no output
    ego_only: np.ndarray | None         # the ego detector's own records on /agent{ego}/coop/objects
    fused_latency_ms: float | None      # ROS time from the stamp to the fused output's receipt
    ego_only_latency_ms: float | None


@dataclass(frozen=True)
class WallToBag:
    """Wall-clock time during a replay -> the bag time played at that moment. The player publishes
    the message logged at bag time ``t`` at wall time ``wall_start_ns + (t - bag_start_ns) / rate``
    (``ros.bag_player``), so a wall time ``w`` is bag time ``bag_start_ns + (w - wall_start_ns) *
    rate``: at rate 1 a wall-time interval is the same bag-time interval, at rate 0.1 a tenth."""
    wall_start_ns: int      # wall time (time.time) at which the player's schedule started
    bag_start_ns: int       # the first log time of the played bag
    rate: float             # bag time per wall time

    def __call__(self, wall_ns: int) -> int:
        return self.bag_start_ns + round((wall_ns - self.wall_start_ns) * self.rate)


def _objects_by_stamp(bag: BagReader, topic: str, log_to_bag=None) -> dict[int, tuple[float, np.ndarray]]:
    """header stamp (ns) -> (bag time of receipt - stamp in ms, object records) of every message on
    ``topic``; ``log_to_bag`` maps a log time to bag time (default: the log time is bag time)."""
    if topic not in bag.topics:
        return {}
    out = {}
    for _, t_ns, msg in bag.messages([topic]):
        stamp = ros_msgs.stamp_ns(msg.header.stamp)
        received = t_ns if log_to_bag is None else log_to_bag(t_ns)
        out[stamp] = ((received - stamp) * 1e-6, ros_msgs.cloud_to_objects(msg).copy())
    return out


def replay_frames(record, dataset, scene: int, ego: int, fused_topic: str, ego_topic: str,
                  log_to_bag=None) -> tuple[list, int]:
    """The ego frames of ``scene`` with what the recorded bag ``record`` holds for them on
    ``fused_topic`` and ``ego_topic``. -> (frames in capture order, outputs whose stamp is no ego
    capture stamp of the scene). ``log_to_bag`` maps the recording's log times to bag time (e.g.
    ``WallToBag``); by default they are the recorder's ROS time, i.e. bag time already."""
    with BagReader(record) as bag:
        fused = _objects_by_stamp(bag, fused_topic, log_to_bag)
        local = _objects_by_stamp(bag, ego_topic, log_to_bag)
    frames = []
    for f in range(dataset.num_frames(scene)):
        sample = dataset.sample(scene, f)
        if ego not in sample.agents:
            continue
        stamp = int(sample.agents[ego].timestamp_us) * 1000
        boxes, labels, _ = cooperative_targets(sample, ego)
        fused_ms, fused_objects = fused.get(stamp, (None, None))
        local_ms, local_objects = local.get(stamp, (None, None))
        frames.append(ReplayFrame(f, stamp, boxes, np.asarray(labels), fused_objects, local_objects, fused_ms,
                                  local_ms))
    known = {fr.stamp_ns for fr in frames}
    stray = sum(1 for s in list(fused) + list(local) if s not in known)
    return frames, stray


def score(frames: list[ReplayFrame], which: str, classes, max_range: float) -> dict:
    """AP of ``which`` ('fused' or 'ego_only') over every frame: {'ap50', 'ap70' (headline class),
    'summary' (APAccumulator.summary()), 'frames_with_output'}."""
    acc = APAccumulator(classes, max_range=max_range)
    with_output = 0
    for fr in frames:
        objects = getattr(fr, which)
        with_output += objects is not None
        if objects is None:
            objects = np.zeros(0, OBJECT_DTYPE)
        acc.add_frame(object_boxes(objects), objects['score'], objects['label'], fr.gt_boxes, fr.gt_labels)
    summary = acc.summary()
    head = summary['ap'][HEADLINE_CLASS]
    return {'ap50': head['0.5'], 'ap70': head['0.7'], 'summary': summary, 'frames_with_output': with_output}


def latency_summary(frames: list[ReplayFrame], which: str) -> dict | None:
    """{'p50', 'p95', 'max' (ms of ROS time), 'n'} of ``which`` ('fused' or 'ego_only') over the
    frames that have it; None when none has."""
    values = np.array([v for fr in frames if (v := getattr(fr, f'{which}_latency_ms')) is not None])
    if not len(values):
        return None
    return {'p50': round(float(np.percentile(values, 50)), 1), 'p95': round(float(np.percentile(values, 95)), 1),
            'max': round(float(values.max()), 1), 'n': int(len(values))}


def last_json(record, topic: str) -> dict | None:
    """The newest std_msgs/String JSON message on ``topic`` of a recorded bag (None if none)."""
    with BagReader(record) as bag:
        if topic not in bag.topics:
            return None
        last = None
        for _, _, msg in bag.messages([topic]):
            last = msg
    return json.loads(last.data) if last is not None else None
