"""Seeded V2X channel models: whether each message arrives, how late, and how far off the
sender's clock is.

A ``Channel`` combines one latency model with packet loss and a per-link clock offset. Every link
(collaborator id) draws from its own random streams derived from ``(seed, link)``, so a link's
sequence does not depend on how sends to different links interleave. Latency, loss and clock offset
use separate streams, so e.g. sweeping the mean delay keeps the same messages lost.

Spec dicts (``make_channel``), times in milliseconds::

    {'model': 'fixed', 'latency_ms': 100}
    {'model': 'uniform', 'low_ms': 100, 'high_ms': 300}
    {'model': 'bernoulli_frames', 'frame_ms': 100, 'trials': 10, 'p': 0.2}
    {'model': 'bandwidth', 'base_ms': 20, 'bandwidth_mbps': 10, 'jitter_ms': 5}

plus the common keys ``loss`` (probability), ``seed``, ``clock_offset_ms`` (mean offset of every
sender's clock) and ``clock_offset_std_ms`` (per-link spread around it).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Hashable

import numpy as np

NS_PER_S = 1_000_000_000
_MS = 1e-3


@dataclass(frozen=True)
class FixedLatency:
    latency_ms: float

    def __post_init__(self):
        _require(self.latency_ms >= 0, f'latency_ms must be >= 0, got {self.latency_ms}')

    def sample(self, rng: np.random.Generator, nbytes: int) -> float:
        return self.latency_ms * _MS

    def mean_s(self, nbytes: int = 0) -> float:
        return self.latency_ms * _MS


@dataclass(frozen=True)
class UniformLatency:
    low_ms: float
    high_ms: float

    def __post_init__(self):
        _require(0 <= self.low_ms <= self.high_ms,
                 f'need 0 <= low_ms <= high_ms, got {self.low_ms}, {self.high_ms}')

    def sample(self, rng: np.random.Generator, nbytes: int) -> float:
        return rng.uniform(self.low_ms, self.high_ms) * _MS

    def mean_s(self, nbytes: int = 0) -> float:
        return 0.5 * (self.low_ms + self.high_ms) * _MS


@dataclass(frozen=True)
class BernoulliFramesLatency:
    """Delay of a whole number of frame periods: the number of successes in ``trials`` Bernoulli(p)
    trials, the irregular-asynchrony setting CoDynTrust evaluates (after CoBEVFlow), where a
    collaborator's frame is that many frames older than the ego's. Mean ``trials * p * frame_ms``.
    """

    p: float
    frame_ms: float = 100.0
    trials: int = 10

    def __post_init__(self):
        _require(0 <= self.p <= 1, f'p must be in [0, 1], got {self.p}')
        _require(self.frame_ms > 0, f'frame_ms must be > 0, got {self.frame_ms}')
        _require(isinstance(self.trials, (int, np.integer)) and self.trials >= 1,
                 f'trials must be an integer >= 1, got {self.trials!r}')

    def sample(self, rng: np.random.Generator, nbytes: int) -> float:
        return int(rng.binomial(self.trials, self.p)) * self.frame_ms * _MS

    def mean_s(self, nbytes: int = 0) -> float:
        return self.trials * self.p * self.frame_ms * _MS


@dataclass(frozen=True)
class BandwidthLatency:
    """``base + bytes * 8 / bandwidth + jitter``, jitter exponential with mean ``jitter_ms``
    (queueing delay: non-negative, occasionally long)."""

    base_ms: float
    bandwidth_mbps: float
    jitter_ms: float = 0.0

    def __post_init__(self):
        _require(self.base_ms >= 0, f'base_ms must be >= 0, got {self.base_ms}')
        _require(self.bandwidth_mbps > 0, f'bandwidth_mbps must be > 0, got {self.bandwidth_mbps}')
        _require(self.jitter_ms >= 0, f'jitter_ms must be >= 0, got {self.jitter_ms}')

    def transmit_s(self, nbytes: int) -> float:
        return nbytes * 8 / (self.bandwidth_mbps * 1e6)

    def sample(self, rng: np.random.Generator, nbytes: int) -> float:
        jitter = rng.exponential(1.0) * self.jitter_ms
        return (self.base_ms + jitter) * _MS + self.transmit_s(nbytes)

    def mean_s(self, nbytes: int = 0) -> float:
        return (self.base_ms + self.jitter_ms) * _MS + self.transmit_s(nbytes)


LATENCY_MODELS = {
    'fixed': FixedLatency,
    'uniform': UniformLatency,
    'bernoulli_frames': BernoulliFramesLatency,
    'bandwidth': BandwidthLatency,
}
_COMMON_KEYS = {'model', 'loss', 'seed', 'clock_offset_ms', 'clock_offset_std_ms'}

LatencyModel = FixedLatency | UniformLatency | BernoulliFramesLatency | BandwidthLatency


@dataclass(frozen=True)
class Delivery:
    """Fate of one message. ``latency_s`` is ``inf`` when the message is lost.

    ``clock_offset_s``: the sender's clock reads true time + offset, so the stamp it writes on a
    message captured at true time t is t + offset.
    """

    delivered: bool
    latency_s: float
    clock_offset_s: float

    def arrival_ns(self, capture_ns: int) -> int | None:
        """Receiver (true) time of arrival of a message captured at true ``capture_ns``; ``None``
        if lost."""
        return capture_ns + round(self.latency_s * NS_PER_S) if self.delivered else None

    def stamp_ns(self, capture_ns: int) -> int:
        """Header stamp the sender writes for a capture at true ``capture_ns``."""
        return capture_ns + round(self.clock_offset_s * NS_PER_S)


class _Link:
    def __init__(self, seed: int, link: Hashable, offset_mean_s: float, offset_std_s: float):
        # str(link) keeps agent 3 and '3' on one stream; unlike hash() it is stable across runs.
        key = int.from_bytes(hashlib.blake2b(str(link).encode(), digest_size=8).digest(), 'little')
        streams = np.random.SeedSequence(seed, spawn_key=(key,)).spawn(3)
        offset_rng, self.loss_rng, self.latency_rng = (np.random.default_rng(s) for s in streams)
        self.clock_offset_s = offset_mean_s + offset_std_s * offset_rng.standard_normal()


class Channel:
    """Draws a ``Delivery`` per message on each link; deterministic from ``seed``."""

    def __init__(self, latency: LatencyModel, loss: float = 0.0, seed: int = 0,
                 clock_offset_ms: float = 0.0, clock_offset_std_ms: float = 0.0,
                 spec: dict | None = None):
        _require(0 <= loss < 1, f'loss must be in [0, 1), got {loss}')
        _require(clock_offset_std_ms >= 0,
                 f'clock_offset_std_ms must be >= 0, got {clock_offset_std_ms}')
        self.latency = latency
        self.loss = float(loss)
        self.seed = int(seed)
        self.clock_offset_ms = float(clock_offset_ms)
        self.clock_offset_std_ms = float(clock_offset_std_ms)
        self.spec = spec
        self._links: dict[str, _Link] = {}

    def _link(self, link: Hashable) -> _Link:
        state = self._links.get(str(link))
        if state is None:
            state = self._links[str(link)] = _Link(self.seed, link, self.clock_offset_ms * _MS,
                                                   self.clock_offset_std_ms * _MS)
        return state

    def clock_offset_s(self, link: Hashable) -> float:
        """Constant offset of ``link``'s sender clock (s)."""
        return self._link(link).clock_offset_s

    def send(self, link: Hashable, nbytes: int = 0) -> Delivery:
        """Fate of the next message of ``nbytes`` bytes on ``link``."""
        state = self._link(link)
        # Both draws happen for every message so loss and latency sequences stay aligned per link.
        lost = state.loss_rng.random() < self.loss
        latency = self.latency.sample(state.latency_rng, nbytes)
        return Delivery(not lost, math.inf if lost else latency, state.clock_offset_s)

    def mean_latency_s(self, nbytes: int = 0) -> float:
        """Expected latency of a delivered message of ``nbytes`` bytes (s)."""
        return self.latency.mean_s(nbytes)


def make_channel(spec: dict) -> Channel:
    """Build a ``Channel`` from a config dict (see the module docstring)."""
    spec = dict(spec)
    name = spec.get('model')
    if name not in LATENCY_MODELS:
        raise ValueError(f'channel model must be one of {sorted(LATENCY_MODELS)}, got {name!r}')
    cls = LATENCY_MODELS[name]
    fields = set(cls.__dataclass_fields__)
    unknown = set(spec) - fields - _COMMON_KEYS
    if unknown:
        raise ValueError(f'unknown key(s) {sorted(unknown)} for channel model {name!r}; '
                         f'allowed: {sorted(fields | _COMMON_KEYS)}')
    try:
        latency = cls(**{k: v for k, v in spec.items() if k in fields})
    except TypeError as e:  # missing required parameter
        raise ValueError(f'channel model {name!r}: {e}') from None
    return Channel(latency, loss=spec.get('loss', 0.0), seed=spec.get('seed', 0),
                   clock_offset_ms=spec.get('clock_offset_ms', 0.0),
                   clock_offset_std_ms=spec.get('clock_offset_std_ms', 0.0), spec=spec)


def channel_for_mean_latency(mean_ms: float, model: str = 'uniform', *, spread: float = 0.5,
                             nbytes: int = 0, **params) -> Channel:
    """A channel whose expected latency is ``mean_ms``.

    ``uniform``: [mean (1 - spread), mean (1 + spread)]. ``bernoulli_frames``: ``p`` solved from
    ``frame_ms`` and ``trials`` (defaults 100 ms, 10). ``bandwidth``: ``base_ms`` solved so that a
    message of ``nbytes`` averages ``mean_ms`` (``bandwidth_mbps`` required). Remaining ``params``
    (``loss``, ``seed``, ``jitter_ms``, ...) go into the spec unchanged.
    """
    _require(mean_ms >= 0, f'mean_ms must be >= 0, got {mean_ms}')
    spec = {'model': model, **params}
    if model == 'fixed':
        spec['latency_ms'] = mean_ms
    elif model == 'uniform':
        _require(0 <= spread <= 1, f'spread must be in [0, 1], got {spread}')
        spec.update(low_ms=mean_ms * (1 - spread), high_ms=mean_ms * (1 + spread))
    elif model == 'bernoulli_frames':
        defaults = BernoulliFramesLatency(0.0)
        frame_ms = spec.setdefault('frame_ms', defaults.frame_ms)
        trials = spec.setdefault('trials', defaults.trials)
        _require(mean_ms <= frame_ms * trials,
                 f'mean {mean_ms} ms exceeds the maximum delay {trials} x {frame_ms} ms')
        spec['p'] = mean_ms / (frame_ms * trials)
    elif model == 'bandwidth':
        _require('bandwidth_mbps' in params, 'the bandwidth model needs bandwidth_mbps')
        transmit_s = BandwidthLatency(0.0, params['bandwidth_mbps']).transmit_s(nbytes)
        fixed_ms = transmit_s / _MS + params.get('jitter_ms', 0.0)
        _require(mean_ms >= fixed_ms, f'mean {mean_ms} ms is below the transmission time plus '
                                      f'mean jitter ({fixed_ms:.3f} ms) of {nbytes} bytes')
        spec['base_ms'] = mean_ms - fixed_ms
    return make_channel(spec)


# What channel_for_mean_latency takes besides the mean, per model, and for every model.
MODEL_SETTINGS = {'fixed': (), 'uniform': ('spread',), 'bernoulli_frames': ('frame_ms', 'trials'),
                  'bandwidth': ('bandwidth_mbps', 'jitter_ms')}
# The models channel_for_mean_latency builds from a mean latency alone (bandwidth needs a rate).
MEAN_LATENCY_MODELS = tuple(m for m in MODEL_SETTINGS if m != 'bandwidth')
COMMON_SETTINGS = ('loss', 'seed', 'clock_offset_ms', 'clock_offset_std_ms')


def channel_from_settings(model: str, mean_latency_ms: float, settings: dict) -> Channel:
    """``channel_for_mean_latency`` from a flat config that holds the settings of every model
    (e.g. ROS parameters): only those ``model`` uses are passed on."""
    if model not in MODEL_SETTINGS:
        raise ValueError(f'channel model must be one of {sorted(MODEL_SETTINGS)}, got {model!r}')
    used = {k: settings[k] for k in MODEL_SETTINGS[model] + COMMON_SETTINGS if k in settings}
    return channel_for_mean_latency(mean_latency_ms, model, **used)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
