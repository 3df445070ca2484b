import numpy as np
import pytest
import torch

from coop_perception.fusion.methods import METHODS
from coop_perception.fusion.network import MultiScaleFusion, max_fusion
from coop_perception.fusion.trust import BOX_TRUST_FEATURES, BoxTrust, LearnedTrust, ThresholdTrust, decay


def attrs(score, unc, age):
    return np.array([[score, *unc, age]], dtype=np.float64)


def test_threshold_gate_and_decay():
    gate = ThresholdTrust(min_score=0.3, thresholds={'cls_aleatoric': 1.0, 'cls_epistemic': 0.5,
                                                     'reg_aleatoric': 0.2, 'reg_epistemic': 0.1},
                          half_life_s=0.5)
    assert gate.trust(attrs(0.9, [0.5, 0.2, 0.1, 0.05], 0.0))[0] == 1.0
    assert gate.trust(attrs(0.2, [0.5, 0.2, 0.1, 0.05], 0.0))[0] == 0.0      # low score
    assert gate.trust(attrs(0.9, [0.5, 0.2, 0.3, 0.05], 0.0))[0] == 0.0      # uncertain box
    assert gate.trust(attrs(0.9, [0.5, 0.2, 0.1, 0.05], 0.5))[0] == 0.5      # one half-life old
    assert gate.trust(np.zeros((0, 6))).shape == (0,)
    assert np.allclose(decay(np.array([-0.1, 0.0, 1.0]), 0.5), [1.0, 1.0, 0.25])


def test_threshold_calibration_uses_true_positive_quantiles():
    rng = np.random.default_rng(0)
    a = np.concatenate([rng.uniform(0.3, 1, (1000, 1)), rng.uniform(0, 1, (1000, 4)), np.zeros((1000, 1))], 1)
    tp = a[:, 3] < 0.5               # correct boxes have small regression uncertainty
    gate = ThresholdTrust.calibrate(a, tp, quantile=0.95)
    assert abs(gate.thresholds['reg_aleatoric'] - 0.475) < 0.03
    assert gate.trust(a)[~tp].mean() < 0.1 and gate.trust(a)[tp].mean() > 0.7


def test_learned_trust_starts_trusting_and_learns():
    net = LearnedTrust()
    x = torch.tensor([[0.9, 0.1, 0.1, 0.1, 0.1, 0.0, 0.0, 20.0], [0.9, 0.1, 0.1, 5.0, 0.1, 0.0, 0.0, 20.0]])
    assert (net(x) > 0.8).all()
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    target = torch.tensor([1.0, 0.0])
    for _ in range(200):
        loss = torch.nn.functional.binary_cross_entropy(net(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    t = net.trust(x.numpy())
    assert t[0] > 0.9 and t[1] < 0.1


def test_untrained_fusion_is_ego_only_and_ignores_invalid_agents():
    torch.manual_seed(0)
    net = MultiScaleFusion(8, scales=2).eval()
    x = torch.randn(2, 3, 8, 16, 16)
    valid = torch.tensor([[True, True, False], [True, False, False]])
    with torch.no_grad():
        assert torch.equal(net(x, valid), x[:, 0])
        # make the projection non-zero: then an invalid agent's content must not matter
        torch.nn.init.normal_(net.project.weight)
        a = net(x, valid)
        y = x.clone()
        y[0, 2] = 100.0
        y[1, 1:] = -100.0
        assert torch.allclose(a, net(y, valid), atol=1e-5)


def test_fusion_backpropagates_to_all_scales():
    net = MultiScaleFusion(8, scales=2)
    torch.nn.init.normal_(net.project.weight)
    x = torch.randn(1, 2, 8, 16, 16, requires_grad=True)
    net(x, torch.tensor([[True, True]])).sum().backward()
    assert x.grad[0, 1].abs().sum() > 0
    assert all(p.grad is not None for p in net.up.parameters())


def test_max_fusion():
    x = torch.tensor([[[[[1.0]]], [[[3.0]]], [[[9.0]]]]])  # (1, 3, 1, 1, 1)
    valid = torch.tensor([[True, True, False]])
    assert max_fusion(x, valid).item() == 3.0


def _warped_message(rng, C, H, W, cells, age_s):
    from coop_perception.fusion.align import WarpedFeatures
    flat = rng.choice(H * W, cells, replace=False)
    features = np.zeros((C, H * W), np.float32)
    features[:, flat] = rng.uniform(0, 3, (C, cells))      # the detector's BEV is non-negative
    roi = np.full(H * W, -1, np.int16)
    roi[flat] = rng.integers(-1, 5, cells)                  # some cells are background
    score = np.where(roi >= 0, rng.uniform(0.3, 1, H * W), 0).astype(np.float32)
    unc = np.where(roi[:, None] >= 0, rng.uniform(0.01, 2, (H * W, 4)), 0).astype(np.float32)
    occupied = np.zeros(H * W, bool)
    occupied[flat] = True
    speed = np.where(roi >= 0, rng.uniform(0, 15, H * W), 0).astype(np.float32)
    range_m = np.where(occupied, rng.uniform(0, 70, H * W), 0).astype(np.float32)
    return WarpedFeatures(features.reshape(C, H, W), occupied.reshape(H, W), score.reshape(H, W),
                          score.reshape(H, W), unc.reshape(H, W, 4), roi.reshape(H, W), speed.reshape(H, W),
                          range_m.reshape(H, W), age_s, 0)


@pytest.mark.parametrize('method', ['trust', 'trust+box', 'gate', 'max'])
def test_sparse_run_time_fusion_equals_the_dense_training_fusion(method):
    from coop_perception.fusion.model import FusionModel, collate, fuse, fuse_sparse, stack_inputs
    rng = np.random.default_rng(3)
    torch.manual_seed(3)
    C, H, W = 8, 16, 24
    model = FusionModel(C, scales=3).eval()
    for p in model.parameters():   # the projection starts at zero: give every layer a say
        torch.nn.init.normal_(p, std=0.3)
    gate = ThresholdTrust(min_score=0.5, thresholds={'reg_aleatoric': 1.0}, half_life_s=0.5)
    if method == 'trust+box':   # the calibrated box trust also weights the cells
        n = len(BOX_TRUST_FEATURES)
        model.box_trust = BoxTrust([0.0] * n, [1.0] * n, rng.normal(0, 0.5, n).tolist(), 0.3)
        method = 'trust'
    ego = rng.uniform(0, 3, (C, H, W)).astype(np.float32)
    ego[:, :4] = 0.0                                        # empty ego cells too
    warped = [_warped_message(rng, C, H, W, n, age) for n, age in ((40, 0.1), (90, 0.3), (10, 0.0))]
    method = METHODS[method]
    with torch.inference_mode():
        dense, dense_trust = fuse(**collate([stack_inputs(ego, warped, 4)]), method=method, model=model, gate=gate)
        sparse, sparse_trust = fuse_sparse(ego, warped, method, 4, model, gate)
        two, _ = fuse_sparse(ego, warped, method, 2, model, gate)
        dense_two, _ = fuse(**collate([stack_inputs(ego, warped, 2)]), method=method, model=model, gate=gate)
    assert sparse.shape == (1, C, H, W) and not torch.equal(sparse[0], torch.from_numpy(ego))
    assert torch.allclose(dense, sparse, atol=1e-5)
    assert np.allclose(dense_trust[0, :3].numpy(), sparse_trust, atol=1e-6)
    if model.box_trust is not None:   # the cells' trust: learned x box trust of their attributes
        attrs = stack_inputs(ego, warped, 4).attributes[0]
        roi = warped[0].roi >= 0
        expect = model.trust(torch.from_numpy(attrs[roi])).detach().numpy() * model.box_trust.trust(attrs[roi])
        assert np.allclose(sparse_trust[0][roi], expect, atol=1e-5)
    assert torch.allclose(dense_two, two, atol=1e-5)
