"""Shared fixtures. ROS traffic stays on loopback: every test process inherits these settings.
They are overwritten, not defaulted: the nodes take discovery from the environment, and a shell
set up for a deployment across computers must not carry the tests onto the network."""
import os

os.environ.update(ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST', ROS_LOCALHOST_ONLY='1')
os.environ.setdefault('ROS_DOMAIN_ID', '41')

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: end-to-end test (minutes); runs in CI too')


@pytest.fixture(scope='session')
def tiny_dataset(tmp_path_factory):
    """A 1-scene, 4-frame, 3-agent synthetic dataset written once per test session."""
    from coop_perception.data.synth import ScenarioConfig, generate

    root = tmp_path_factory.mktemp('tiny_dataset')
    generate(root, 1, ScenarioConfig(seed=7, vehicles=2, frames=4), 'v2.0-mini', progress=False)
    return root
