"""The shipped trust fusion (models/fusion.pt) fits the shipped detector and, on a synthetic scene no
preset generates, beats the ego's own detector in car AP with and without communication delay."""
from pathlib import Path

import numpy as np
import pytest
import torch

from coop_perception.data.synth import PRESETS, ScenarioConfig, generate
from coop_perception.data.v2xsim import DEFAULT_VERSION, V2XSimDataset
from coop_perception.detection.checkpoint import load_detector
from coop_perception.detection.config import load_config
from coop_perception.detection.model import apply_threads
from coop_perception.detection.targets import batch_targets, detection_loss, example_targets
from coop_perception.eval.fusion_eval import evaluate_fusion
from coop_perception.fusion.cache import feature_cache
from coop_perception.fusion.model import FusionModel, collate
from coop_perception.fusion.train import FusionExamples, load_fusion_config

MODELS = Path(__file__).resolve().parents[1] / 'models'
# A seed no preset uses (a scene is drawn from (seed, scene index)), so no frame of it was trained
# or tuned on. 5 agents (RSU + 4 vehicles, each ego in turn), 8 frames.
SEED, AGENTS, FRAMES = 777, 5, 8
DELAYS_MS = [0.0, 300.0]


def test_unseen_seed():
    assert SEED not in {preset['seed'] for preset in PRESETS.values()}


def test_fusion_channels_match_the_detector():
    fusion = FusionModel.load(MODELS / 'fusion.pt')        # its weights load strictly into its config
    detector = load_detector(MODELS / 'detector.pt', MODELS / 'detector.yaml')
    channels = detector.cfg.model.feature_channels
    # what trust_fusion checks before it runs: the detector's shared BEV map feeds the fusion
    assert fusion.config['channels'] == channels == load_config(MODELS / 'detector.yaml').model.feature_channels
    assert fusion.fusion.project.weight.shape[0] == channels   # the fused map goes into the detector's head


@pytest.fixture(scope='module')
def unseen(tmp_path_factory):
    """(dataset, shipped detector, its feature cache) of a fresh synthetic scene, built once."""
    root = tmp_path_factory.mktemp('unseen_scene')
    generate(root, 1, ScenarioConfig(seed=SEED, vehicles=AGENTS - 1, frames=FRAMES), DEFAULT_VERSION, progress=False)
    ds = V2XSimDataset(root)
    detector = load_detector(MODELS / 'detector.pt', MODELS / 'detector.yaml')
    apply_threads(detector.cfg)
    cache, written = feature_cache(ds, detector, MODELS / 'detector.pt', root / 'feature_cache', progress=False)
    assert written == AGENTS * FRAMES
    return ds, detector, cache


def test_trust_fusion_beats_ego_only_on_an_unseen_scene(unseen):
    ds, detector, cache = unseen
    view = cache.load(ds.scenes[0].name, 0, 1)
    assert view.detections.features.shape[0] == detector.cfg.model.feature_channels
    result = evaluate_fusion(ds, detector, cache, FusionModel.load(MODELS / 'fusion.pt'), ['ego', 'trust'],
                             DELAYS_MS, progress=False)
    ap = {(r['method'], r['delay_ms']): r for r in result['results']}
    assert all(r['frames'] == (AGENTS - 1) * FRAMES for r in ap.values())   # every vehicle as ego, every frame
    table = {k: (round(100 * r['ap50'], 1), round(100 * r['ap70'], 1)) for k, r in ap.items()}
    ego = ap[('ego', 0.0)]
    assert ego['ap50'] >= 0.3, table                                  # the ego sees cars: a real baseline
    for delay in DELAYS_MS:
        trust = ap[('trust', delay)]
        for key in ('ap50', 'ap70'):
            assert trust[key] > ego[key], (delay, key, table)
    # with no delay the collaborators' view is worth a lot (on the test preset: +20 to +25 points)
    assert ap[('trust', 0.0)]['ap50'] >= ego['ap50'] + 0.1 and ap[('trust', 0.0)]['ap70'] >= ego['ap70'] + 0.1, table


def test_learned_fusion_lowers_the_detector_loss(unseen):
    """The scene above shows trust fusion's AP gain, but most of it comes from the collaborators'
    ROI boxes, which an untrained fusion decodes as well. This checks the learned weights: on
    examples drawn as in training (models/fusion.yaml), the detector's loss on the fused map is far
    below its loss on the ego's features alone (what an untrained, zero-residual fusion gives)."""
    ds, detector, cache = unseen
    examples = FusionExamples(ds, cache)
    rng = np.random.default_rng(0)
    items = [examples.example(i, rng, load_fusion_config(MODELS / 'fusion.yaml')) for i in range(0, len(examples), 4)]
    targets = batch_targets([example_targets(b, lab, v, h, detector.cfg) for _, (b, lab, v), h in items], detector.cfg)
    batch = collate([x for x, _, _ in items])

    def loss(features):
        maps = detector.head.eval()(features)
        return float(detection_loss({k: v.float() for k, v in maps.items() if k != 'cells'}, targets, detector.cfg)[0])

    with torch.no_grad():
        fused, _ = FusionModel.load(MODELS / 'fusion.pt')(**batch)
        ego_alone, with_fusion = loss(batch['ego']), loss(fused)
    assert with_fusion < 0.6 * ego_alone, (with_fusion, ego_alone)


def test_box_trust_calibrates_on_an_unseen_scene_and_ranks_better_than_the_score(unseen):
    from coop_perception.eval.box_trust_calibration import calibrate_box_trust

    ds, detector, cache = unseen
    trust, summary = calibrate_box_trust(ds, detector, cache, progress=False)
    assert summary['boxes'] > 100 and 0 < summary['true_positives'] < summary['boxes']
    assert np.isfinite(trust.weights).all() and summary['auroc_trust'] > summary['auroc_score']
