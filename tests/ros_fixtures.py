"""Small models and helpers shared by the ROS node tests (no rclpy import here)."""
from pathlib import Path

import torch
import yaml

from coop_perception.detection.checkpoint import save_checkpoint
from coop_perception.detection.config import load_config, with_overrides
from coop_perception.detection.model import Detector
from coop_perception.fusion.model import FusionModel
from coop_perception.ros.fuzz import valid_scan  # noqa: F401  (re-exported: the tests' scan)

ROOT = Path(__file__).resolve().parents[1]

# A detector small enough to run many times a second on a shared core: 25.6 m square, 32 x 32 BEV
# cells of 16 channels, 2 MC passes.
TINY = {'voxel': {'range_xy': [-12.8, -12.8, 12.8, 12.8]},
        'model': {'encoder_channels': [8, 16, 16], 'backbone_channels': [16, 32], 'feature_channels': 16,
                  'head_channels': 16},
        'decode': {'mc_passes': 2, 'max_boxes': 20, 'pre_nms_top_k': 64}}


def write_tiny_models(folder: Path) -> dict:
    """Random-weight detector (config + checkpoint) and untrained fusion model in ``folder``;
    returns the node parameters that load them."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = with_overrides(load_config(ROOT / 'models' / 'detector.yaml'), **TINY)
    (folder / 'detector.yaml').write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    torch.manual_seed(0)
    save_checkpoint(folder / 'detector.pt', Detector(cfg).eval())
    FusionModel(cfg.model.feature_channels).save(folder / 'fusion.pt')
    return {'detector_config': str(folder / 'detector.yaml'), 'detector_weights': str(folder / 'detector.pt'),
            'fusion_model': str(folder / 'fusion.pt')}


def write_replay_inputs(tmp: Path, agents: int, trust_fusion: dict, v2x_channel: dict | None = None) -> Path:
    """A synthetic scene of ``agents`` agents (8 frames, seed 3) as the bag ``tmp/bag``, tiny models
    and a parameter file that loads them and shares every detection, with these ``trust_fusion`` and
    ``v2x_channel`` parameters on top; returns the parameter file."""
    from coop_perception import cli

    assert cli.main(['synth', '--out', str(tmp / 'data'), '--scenes', '1', '--frames', '8', '--agents', str(agents),
                     '--seed', '3', '--quiet']) == 0
    assert cli.main(['to-bag', str(tmp / 'data'), '--out', str(tmp / 'bag')]) == 0
    models = write_tiny_models(tmp / 'models')
    config = yaml.safe_load((ROOT / 'config' / 'coop_perception.yaml').read_text())
    config['/**']['ros__parameters'].update(detector_config=models['detector_config'],
                                            detector_weights=models['detector_weights'])
    # Random weights score ~0.1: share every detection so that ROI cells reach the fusion.
    config['/**/lidar_detector']['ros__parameters']['roi']['score_threshold'] = 0.0
    config['/**/trust_fusion']['ros__parameters'].update(fusion_model=models['fusion_model'], **trust_fusion)
    config['/**/v2x_channel']['ros__parameters'].update(v2x_channel or {})
    (tmp / 'params.yaml').write_text(yaml.safe_dump(config))
    return tmp / 'params.yaml'
