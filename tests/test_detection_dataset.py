"""Training examples from every agent of a (tiny, generated) V2X-Sim-format dataset."""
import numpy as np
import pytest

from coop_perception.data.synth import ScenarioConfig, generate
from coop_perception.data.v2xsim import DEFAULT_VERSION, V2XSimDataset
from coop_perception.detection.dataset import AgentViewExamples
from coop_perception.geometry import points_in_boxes


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp('synth')
    generate(root, 1, ScenarioConfig(seed=5, frames=1), DEFAULT_VERSION, progress=False)
    return V2XSimDataset(root)


def test_every_agent_is_an_example(dataset):
    examples = AgentViewExamples(dataset)
    agents = sorted(dataset.sample(0, 0).agents)
    assert len(examples) == len(agents) and [k for _, _, k in examples.index] == agents
    assert len(AgentViewExamples(dataset, agents=[0])) == 1


def test_boxes_are_in_the_sensor_frame_at_capture_time(dataset):
    """The agent's own returns fall into its boxes as often as the generator counted them, which
    needs both the frame transform and the move to each agent's capture time to be right."""
    sample = dataset.sample(0, 0)
    for i, ex in enumerate(AgentViewExamples(dataset)):
        k = sample.agents[list(sample.agents)[i]].agent_id
        counts = sample.gt.agent_points[k]
        seen = counts >= 1
        assert len(ex.boxes) == seen.sum() and ex.points.shape[1] == 4
        assert ex.labels.tolist() == sample.gt.labels[seen].tolist()
        grown = ex.boxes.copy()
        grown[:, 3:6] += 0.1  # range noise; boxes move linearly to the capture time, actors may turn
        measured = points_in_boxes(ex.points, grown).sum(1)
        # without the move to the capture time this drops to ~0.96 on this scene
        assert np.minimum(measured, counts[seen]).sum() >= 0.99 * counts[seen].sum()
        speed = np.linalg.norm(ex.velocities, axis=1)
        np.testing.assert_allclose(speed, np.linalg.norm(sample.gt.velocities[seen], axis=1), atol=1e-9)
