"""Speed of the data layer: synthetic agent-scan generation and scan reading (median ms)."""
from __future__ import annotations

import tempfile
import time

import numpy as np

from .synth import Scenario, ScenarioConfig, generate
from .v2xsim import V2XSimDataset


def bench_synth(frames: int = 20, seed: int = 0) -> dict:
    """Time ray cast + annotation per agent-scan (5 agents) and reading one scan back."""
    scenario = Scenario(ScenarioConfig(seed=seed, frames=frames))
    per_scan = []
    for f in range(frames):
        t = time.perf_counter()
        frame = scenario.frame(f)
        per_scan.append((time.perf_counter() - t) * 1e3 / len(frame.scans))
    with tempfile.TemporaryDirectory() as tmp:
        generate(tmp, 1, ScenarioConfig(seed=seed, frames=4), 'v2.0-mini', progress=False)
        ds = V2XSimDataset(tmp)
        agents = [a for s in ds.samples() for a in s.agents.values()]
        reads = []
        for _ in range(3):
            for a in agents:
                t = time.perf_counter()
                a.load_points()
                reads.append((time.perf_counter() - t) * 1e3)
    return {'median_ms': {'agent_scan': float(np.median(per_scan)), 'read_scan': float(np.median(reads))},
            'scans': frames * len(scenario.agent_ids),
            'points_per_scan': int(np.mean([len(s.points) for s in frame.scans]))}
