"""Training examples from every agent's viewpoint (road-side unit included) of a V2X-Sim-format
dataset (:class:`coop_perception.data.v2xsim.V2XSimDataset` or anything with its interface)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from coop_perception.geometry import invert_pose, rotate_vectors_2d, transform_boxes

from .sweeps import Sweep, stack_sweeps
from .train import TrainExample


class AgentViewExamples(Sequence):
    """Item i: one agent's scan with the ground truth in its sensor frame, as a TrainExample.

    Ground truth is annotated at the sample time while each agent captures at its own time, so
    boxes are first moved with their velocities to the agent's capture time. The agent's own
    vehicle is dropped, and so are boxes it saw fewer than ``min_points`` LiDAR returns on (they
    become background) when the dataset provides per-agent counts.
    Velocities stay absolute (world motion), expressed along the sensor axes.
    With ``sweeps`` > 1 the agent's scans of the previous frames of the scene (as far back as
    ``max_age_s``) are stacked under its scan (detection.sweeps), as the detector node does live.
    """

    def __init__(self, dataset, frames: Sequence[tuple[int, int]] | None = None,
                 agents: Sequence[int] | None = None, min_points: int = 1, sweeps: int = 1,
                 max_age_s: float = 0.25):
        self.dataset, self.min_points = dataset, min_points
        self.sweeps, self.max_age_s = sweeps, max_age_s
        if frames is None:
            frames = [(s, f) for s in range(len(dataset.scenes)) for f in range(dataset.num_frames(s))]
        self.index: list[tuple[int, int, int]] = []
        for s, f in frames:
            for k in dataset.sample(s, f).agents:
                if agents is None or k in agents:
                    self.index.append((s, f, k))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> TrainExample:
        s, f, k = self.index[i]
        sample = self.dataset.sample(s, f)
        agent = sample.agents[k]
        gt = sample.gt
        T_sensor_world = invert_pose(agent.T_world_sensor)
        boxes = gt.boxes_at((agent.timestamp_us - sample.timestamp_us) * 1e-6)
        keep = np.ones(len(boxes), bool)
        counts = gt.agent_points.get(k)
        if counts is not None:
            keep &= counts >= self.min_points
        own = sample.agent_box(k)
        if own >= 0:
            keep[own] = False
        points, ages = agent_sweeps(self.dataset, s, f, k, self.sweeps, self.max_age_s)
        return TrainExample(
            points=points,
            boxes=transform_boxes(T_sensor_world, boxes[keep]),
            labels=np.asarray(gt.labels, np.int64)[keep],
            velocities=rotate_vectors_2d(T_sensor_world, gt.velocities[keep]),
            sensor_height=None,
            ages=ages if self.sweeps > 1 else None)


def agent_sweeps(dataset, s: int, f: int, k: int, sweeps: int, max_age_s: float) -> tuple[np.ndarray, np.ndarray]:
    """Agent k's scan at (scene s, frame f) with its scans of up to ``sweeps - 1`` previous frames
    stacked under it (detection.sweeps): points (N, 4) in its sensor frame, ages (N,) s."""
    def sweep(frame: int) -> Sweep:
        agent = dataset.sample(s, frame).agents[k]
        return Sweep(agent.load_points()[:, :4], agent.T_world_sensor, agent.timestamp_us * 1000)

    previous = [sweep(g) for g in range(f - 1, max(f - sweeps, -1), -1) if k in dataset.sample(s, g).agents]
    return stack_sweeps(sweep(f), previous, max_age_s)
