"""Dynamic feature trust modulus (CoDynTrust's DFTM): one trust value in [0, 1] per collaborator
ROI from its detection score, classification and regression uncertainty (aleatoric and
epistemic) and its staleness.

Two forms share one interface, `trust(attributes) -> (n,)`:

* `ThresholdTrust` — the calibrated gate: an ROI is trusted when its score is high enough and every
  uncertainty is below a threshold calibrated on validation true positives; trust then decays
  exponentially with age.
* `LearnedTrust` — a small MLP on the same inputs, trained jointly with the fusion network.

Attribute columns (the one place they are named): ROI_ATTRIBUTES.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.special import expit
from torch import nn

# score (0..1), the four uncertainties (codec order), age (s) = ego stamp - capture stamp,
# displacement (m) = the ROI's tracked speed x age: how far the motion compensation moved it,
# which its misplacement grows with, and range (m): its distance from the sensor that saw it
# (BEV), beyond which a 32-beam LiDAR puts few points on an object
ROI_ATTRIBUTES = ('score', 'cls_aleatoric', 'cls_epistemic', 'reg_aleatoric', 'reg_epistemic', 'age',
                  'displacement', 'range')
UNCERTAINTIES = ROI_ATTRIBUTES[1:5]


def roi_attributes(score: np.ndarray, uncertainty: np.ndarray, age_s: float, speed=0.0,
                   range_m=0.0) -> np.ndarray:
    """score (n,), uncertainty (n, 4) (codec order, NaN = not estimated), one age (s), the ROIs'
    speeds (m/s) and ranges from their sender's sensor (m), each (n,) or one for all ->
    (n, len(ROI_ATTRIBUTES)) float32 rows; an unknown uncertainty counts as very uncertain, a
    negative age (clock offset) moves nothing."""
    score = np.asarray(score, np.float32).reshape(-1)
    out = np.empty((len(score), len(ROI_ATTRIBUTES)), np.float32)
    out[:, 0] = score
    out[:, 1:5] = np.nan_to_num(np.asarray(uncertainty, np.float32).reshape(-1, 4), nan=1e3)
    out[:, 5] = age_s
    out[:, 6] = _per_row(speed, len(score)) * max(float(age_s), 0.0)
    out[:, 7] = _per_row(range_m, len(score))
    return out


def _per_row(value, n: int) -> np.ndarray:
    """One value or (n,) values -> (n,) float32."""
    return np.broadcast_to(np.asarray(value, np.float32).reshape(-1), n)


@dataclass
class ThresholdTrust:
    """Calibrated gate. thresholds: upper bound per uncertainty (same order as UNCERTAINTIES)."""
    min_score: float = 0.3
    thresholds: dict[str, float] = field(default_factory=lambda: {u: np.inf for u in UNCERTAINTIES})
    half_life_s: float = 0.5       # trust halves every half_life_s of staleness
    soft: float = 0.0              # 0: hard gate; > 0: logistic gate of this width (in log units)

    def trust(self, attributes: np.ndarray) -> np.ndarray:
        """(n, len(ROI_ATTRIBUTES)) -> (n,) trust in [0, 1]."""
        a = np.asarray(attributes, dtype=np.float64)
        if len(a) == 0:
            return np.zeros(0)
        gate = (a[:, 0] >= self.min_score).astype(np.float64)
        for j, name in enumerate(UNCERTAINTIES, start=1):
            limit = self.thresholds.get(name, np.inf)
            if not np.isfinite(limit):
                continue
            if self.soft > 0:
                excess = np.log(np.maximum(a[:, j], 1e-9)) - np.log(max(limit, 1e-9))
                gate *= 1.0 / (1.0 + np.exp(excess / self.soft))
            else:
                gate *= a[:, j] <= limit
        return gate * decay(a[:, 5], self.half_life_s)

    @classmethod
    def calibrate(cls, attributes: np.ndarray, is_true_positive: np.ndarray, quantile: float = 0.95,
                  **kwargs) -> 'ThresholdTrust':
        """Thresholds at the `quantile` of each uncertainty over true positives (validation data):
        an ROI more uncertain than 95 % of correct detections is not trusted."""
        a = np.asarray(attributes, dtype=np.float64)
        tp = np.asarray(is_true_positive, bool)
        thresholds = {}
        for j, name in enumerate(UNCERTAINTIES, start=1):
            values = a[tp, j][np.isfinite(a[tp, j])]
            thresholds[name] = float(np.quantile(values, quantile)) if len(values) else np.inf
        return cls(thresholds=thresholds, **kwargs)

    def to_dict(self) -> dict:
        return {'min_score': self.min_score, 'thresholds': dict(self.thresholds),
                'half_life_s': self.half_life_s, 'soft': self.soft}

    @classmethod
    def from_dict(cls, d: dict) -> 'ThresholdTrust':
        unknown = set(d) - {'min_score', 'thresholds', 'half_life_s', 'soft'}
        if unknown:
            raise ValueError(f'unknown trust gate keys: {", ".join(sorted(unknown))}')
        return cls(**{**d, 'thresholds': {k: float(v) for k, v in d.get('thresholds', {}).items()}})


BOX_TRUST_FEATURES = ('logit_score', 'log_cls_aleatoric', 'cls_epistemic', 'log_reg_aleatoric',
                      'log_reg_epistemic', 'age', 'displacement', 'range')


def box_trust_features(attributes: np.ndarray) -> np.ndarray:
    """ROI attributes (n, 8) of boxes (or cells) moved to the ego stamp -> (n,
    len(BOX_TRUST_FEATURES)): the score as a logit, log variances, the age (s), how far the motion
    compensation moved the box (speed x age, m), whose error grows with both, and its range from
    the sender (m)."""
    a = np.asarray(attributes, np.float64).reshape(-1, len(ROI_ATTRIBUTES))
    score = np.clip(a[:, 0], 1e-4, 1 - 1e-4)
    logs = np.log(np.maximum(a[:, [1, 3, 4]], 1e-6))
    return np.column_stack([np.log(score / (1 - score)), logs[:, 0], a[:, 2], logs[:, 1], logs[:, 2], a[:, 5],
                            a[:, 6], a[:, 7]])


@dataclass
class BoxTrust:
    """Trust of a collaborator's box at the ego stamp: the probability that it is a true positive
    at IoU 0.7, a logistic model of `box_trust_features` fitted on validation outcomes under
    delay (eval.box_trust_calibration); it rescores the box and weights the ROI's cells."""
    mean: list[float]          # per feature, for standardisation
    std: list[float]
    weights: list[float]
    bias: float

    def trust(self, attributes: np.ndarray) -> np.ndarray:
        """(n, 8) attributes -> (n,) trust in (0, 1)."""
        x = (box_trust_features(attributes) - np.asarray(self.mean)) / np.asarray(self.std)
        return expit(x @ np.asarray(self.weights) + self.bias)  # no overflow warning for extreme inputs

    @classmethod
    def fit(cls, features: np.ndarray, is_true_positive: np.ndarray, l2: float = 1e-2) -> 'BoxTrust':
        """Logistic regression (L2-regularised) of is_true_positive (n,) on features (n, F)."""
        from scipy.optimize import minimize

        mean, std = features.mean(0), features.std(0) + 1e-9
        x = (features - mean) / std
        y = np.asarray(is_true_positive, np.float64)

        def loss(p):
            z = x @ p[:-1] + p[-1]
            nll = np.logaddexp(0.0, z) - y * z
            grad_z = 1.0 / (1.0 + np.exp(-z)) - y
            return nll.mean() + l2 * p[:-1] @ p[:-1], np.append(x.T @ grad_z / len(y) + 2 * l2 * p[:-1], grad_z.mean())

        p = minimize(loss, np.zeros(x.shape[1] + 1), jac=True, method='L-BFGS-B').x
        return cls(mean.tolist(), std.tolist(), p[:-1].tolist(), float(p[-1]))

    def to_dict(self) -> dict:
        return {'features': list(BOX_TRUST_FEATURES), 'mean': list(self.mean), 'std': list(self.std),
                'weights': list(self.weights), 'bias': self.bias}

    @classmethod
    def from_dict(cls, d: dict) -> 'BoxTrust':
        """From `to_dict` (other keys, such as where it was calibrated, are ignored)."""
        if list(d.get('features', [])) != list(BOX_TRUST_FEATURES):
            raise ValueError(f'box trust features {d.get("features")} differ from {list(BOX_TRUST_FEATURES)}')
        return cls(list(d['mean']), list(d['std']), list(d['weights']), float(d['bias']))


class FlatTrust:
    """Every ROI fully trusted: the trust modulus of the ``trust_flat`` ablation."""

    def trust(self, attributes: np.ndarray) -> np.ndarray:
        return np.ones(len(attributes))


def decay(age_s: np.ndarray, half_life_s: float) -> np.ndarray:
    """Staleness factor 2^(-age / half_life); negative ages (clock offsets) count as fresh."""
    return np.power(0.5, np.maximum(np.asarray(age_s, np.float64), 0.0) / half_life_s)


def trust_features(attributes: torch.Tensor) -> torch.Tensor:
    """(..., 8) raw attributes -> network inputs: score, log uncertainties, age (s), displacement
    (m), range (in 50 m, the scale of the others)."""
    score = attributes[..., :1]
    logs = torch.log(attributes[..., 1:5].clamp_min(1e-6))
    return torch.cat([score, logs, attributes[..., 5:7], attributes[..., 7:8] / 50.0], -1)


class LearnedTrust(nn.Module):
    """MLP (8 -> hidden -> 1, sigmoid) on `trust_features`; learned jointly with the fusion."""

    def __init__(self, hidden: int = 16):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(len(ROI_ATTRIBUTES), hidden), nn.ReLU(), nn.Linear(hidden, 1))
        # Start trusting everything that is fresh, so early fusion training sees the collaborators.
        nn.init.zeros_(self.net[2].weight)
        nn.init.constant_(self.net[2].bias, 2.0)

    def forward(self, attributes: torch.Tensor) -> torch.Tensor:
        """(..., 8) -> (...,) trust in (0, 1)."""
        return torch.sigmoid(self.net(trust_features(attributes))[..., 0])

    @torch.inference_mode()
    def trust(self, attributes: np.ndarray) -> np.ndarray:
        a = torch.as_tensor(np.asarray(attributes, np.float32), device=next(self.parameters()).device)
        return self(a).cpu().numpy().astype(np.float64) if len(a) else np.zeros(0)
