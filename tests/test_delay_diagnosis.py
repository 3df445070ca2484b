"""`eval delay-oracles`' velocity report: what feeds the prediction, and the measured velocities."""
import numpy as np
import pytest

from coop_perception.bev_grid import BevGrid
from coop_perception.data.v2xsim import V2XSimDataset
from coop_perception.detection.decode import Detections
from coop_perception.eval.delay_diagnosis import _truth_in_sensor_frame, format_diagnosis, velocity_errors
from coop_perception.fusion.cache import CachedView
from coop_perception.geometry import invert_pose, rotate_vectors_2d


class TruthViews:
    """A cache whose every view 'detects' the true boxes, with the true velocities plus ``offset``
    (m/s) as measurements of noise 0.1 m/s on every other box."""

    def __init__(self, dataset, offset):
        self.dataset, self.offset = dataset, np.asarray(offset, np.float64)

    def load(self, scene_name, frame, agent):
        smp = self.dataset.sample(0, frame)
        a = smp.agents[agent]
        boxes = _truth_in_sensor_frame(smp, agent, a.timestamp_us)
        n = len(boxes)
        v = rotate_vectors_2d(invert_pose(a.T_world_sensor), smp.gt.velocities) + self.offset
        std = np.where(np.arange(n) % 2 == 0, 0.1, 0.0).astype(np.float32)
        det = Detections(boxes=boxes, scores=np.ones(n, np.float32), labels=smp.gt.labels.astype(np.int64),
                         velocities=v.astype(np.float32), uncertainty=np.zeros((n, 6), np.float32),
                         features=np.zeros((1, 2, 2), np.float32), confidence=np.zeros((2, 2), np.float32),
                         grid=BevGrid(np.array([-1.0, -1.0]), 1.0, (2, 2)), sensor_height=1.8, velocity_std=std)
        return CachedView(det, a.T_world_sensor, a.timestamp_us * 1000)


def test_velocity_report_separates_tracked_and_measured(tiny_dataset):
    ds = V2XSimDataset(tiny_dataset)
    exact = velocity_errors(ds, TruthViews(ds, (0.0, 0.0)))
    assert exact['n'] > 0 and 0.3 <= exact['measured'] <= 0.7   # every other box measured
    assert exact['measured_median_m_s'] == pytest.approx(0.0, abs=1e-5)
    off = velocity_errors(ds, TruthViews(ds, (0.6, -0.8)))
    assert off['measured_median_m_s'] == pytest.approx(1.0, abs=1e-4)
    assert off['median_m_s'] > exact['median_m_s']
    text = format_diagnosis({'results': [], 'headline_class': 'car', 'max_range_m': 50, 'channel': 'uniform',
                             'seed': 0, 'velocity_error': off})
    assert 'measured velocities' in text and '1.00 m/s' in text
