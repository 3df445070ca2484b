"""What a collaborator puts on the air, besides feature messages (``codec.FeatureMessage``): the
typed inputs of late and early fusion. Each knows its size on the wire, so bandwidth is counted
the same way for every method."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from coop_perception.data.objects import OBJECT_DTYPE

if TYPE_CHECKING:
    from coop_perception.detection.decode import Detections

RAW_POINT_BYTES = 16  # x, y, z, intensity as float32: what a raw scan costs on the wire


@dataclass(frozen=True)
class BoxList:
    """Late fusion's input: a collaborator's boxes in its sensor frame at its capture time."""
    boxes: np.ndarray        # (N, 7) [x, y, z, l, w, h, yaw], m and rad
    scores: np.ndarray       # (N,) in [0, 1]
    labels: np.ndarray       # (N,) int class index
    velocities: np.ndarray   # (N, 2) ground velocity along the sender's axes, m/s
    velocity_std: np.ndarray | None = None  # (N,) its standard deviation per axis, m/s; None, < 0: unknown

    @classmethod
    def from_detections(cls, det: 'Detections', score_threshold: float) -> 'BoxList':
        """The boxes of ``det`` scoring at least ``score_threshold``."""
        keep = det.scores >= score_threshold
        std = np.broadcast_to(np.asarray(det.velocity_std, np.float32), keep.shape)
        return cls(det.boxes[keep], det.scores[keep], det.labels[keep], det.velocities[keep], std[keep])

    @property
    def wire_bytes(self) -> int:
        """Sent as an object list (``/coop/objects`` layout), one record per box."""
        return len(self.boxes) * OBJECT_DTYPE.itemsize


@dataclass(frozen=True)
class RawPoints:
    """Early fusion's input: a collaborator's scan in its sensor frame."""
    points: np.ndarray       # (N, 4) float32 x, y, z (m), intensity

    @property
    def wire_bytes(self) -> int:
        return len(self.points) * RAW_POINT_BYTES
