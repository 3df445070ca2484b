"""Misbehaving collaborators: per-agent consistency evidence, accumulated into a reputation.

A collaborator that invents objects (a phantom), lies about its pose (a shift or spoof) or
replays old messages sends boxes the ego can check against what it sees itself:

* **free space**: a collaborator box, moved to the ego stamp, whose footprint lies where the ego's
  own scan saw through to something farther away (``Detections.free_range``) is contradicted by
  the scene. Only boxes the ego could see are checked: within ``check_range_m`` and not behind
  the ego's nearest obstacle in that direction;
* **offset**: a collaborator's confident boxes matched to the ego's own confident boxes of the same
  class should lie on them up to detection, timing and motion-compensation errors; a median
  distance of the matched pairs beyond ``offset_m`` is what a wrong pose (every box moved) gives.

The other collaborators of the same ego frame testify too (``Witness``), where the ego cannot see
(behind obstacles, beyond its range, another part of the town):

* **their free space**: a box moved to a witness's stamp (with its velocity) and into its sensor
  frame that lies where the witness's profile (sent on its message, fusion.codec) saw through.
  Two reported poses place the box there, so the margin is ``peer_margin_m``. Only boxes the ego
  could not check itself, and only boxes no other agent (the ego or another collaborator) reports
  within ``corroborate_m``: a box two agents see is not invented, and a lying witness cannot
  then frame it. A witness speaks only while it is not excluded and while its own profile leaves
  the ego's confident boxes where they are (an attacker's profile, placed with its false pose or
  claiming free space it did not see, contradicts what the ego sees);
* **their boxes**: the offset is the smallest median matched distance over the ego and the
  trusted witnesses with ``min_matches`` pairs each: one honest agent that agrees suffices to
  clear a collaborator, and a shifted one disagrees with everyone.

Each new message of an agent gives one log-likelihood ratio (misbehaving vs honest), added to
the agent's suspicion, which never goes below 0 (a CUSUM test), decays with ``decay_s`` of ego
time and is capped where the reputation reaches 0. The reputation falls linearly from 1 (no
suspicion) to ``exclude_below`` at ``evidence_to_exclude``: it scales the agent's trust (cells
and boxes) and, below ``exclude_below``, its inputs are not fused. Evidence is still taken from
an excluded agent's messages, so it is readmitted once it behaves.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from ..detection.free_range import azimuth_bins
from ..geometry import bev_corners, rotate_vectors_2d, transform_boxes
from .pose_buffer import NS_PER_S


@dataclass
class ReputationConfig:
    enabled: bool | None = None        # None: on for the 'trust' method only
    min_score: float = 0.5             # boxes (collaborator's and ego's) that count as evidence
    own_radius_m: float = 3.0          # boxes centred this close to the ego's sensor are the ego itself
    check_range_m: float = 40.0        # the ego's free range is trusted this far (beams still hit a car)
    margin_m: float = 1.5              # seen through means free beyond the box by this (m), plus |v| * age
    occluded_m: float = 2.0            # the ego's nearest obstacle this far before the box: not checkable
    # Evidence weights and thresholds calibrated on the val preset (models/fusion.md)
    conflict_llr: float = 2.25         # evidence per box in free space
    clear_llr: float = 0.2             # evidence against per checked box not in free space
    match_radius_m: float = 6.0        # collaborator and ego boxes of one class this close are matched
    min_matches: int = 2               # fewer matched pairs say nothing about an offset
    offset_m: float = 1.5              # median matched distance where offset evidence turns positive
    offset_scale_m: float = 1.0
    offset_llr: float = 2.0            # evidence at offset_m + offset_scale_m (and twice that at most)
    # Well-matched boxes speak only weakly for an agent: a phantom sender's real boxes match too.
    offset_floor: float = -0.3         # in units of offset_llr
    evidence_to_exclude: float = 6.0   # suspicion at which the reputation reaches exclude_below
    exclude_below: float = 0.5
    decay_s: float = 5.0               # suspicion decays by e in this much ego time
    # The other collaborators as witnesses
    peer_margin_m: float = 2.5         # margin_m for a witness's free space (two reported poses place the box)
    corroborate_m: float = 3.0         # a box another agent reports this close is seen by two: not checked
    peer_conflict_llr: float = 5.0     # evidence per box in a witness's free space
    peer_clear_llr: float = 0.1        # evidence against per box witnesses checked without conflict

    def __post_init__(self):
        if not 0.0 < self.exclude_below < 1.0:
            raise ValueError(f'exclude_below must be in (0, 1), got {self.exclude_below}')
        if not (self.evidence_to_exclude > 0 and self.decay_s > 0 and self.check_range_m > 0):
            raise ValueError('evidence_to_exclude, decay_s and check_range_m must be > 0')

    def on_for(self, method: str) -> bool:
        return self.method_default(method) if self.enabled is None else bool(self.enabled)

    @staticmethod
    def method_default(method: str) -> bool:
        return method == 'trust'


@dataclass
class Evidence:
    """What one message of a collaborator says about it."""
    checked: int = 0                   # its confident boxes the ego's free range could check
    conflicts: int = 0                 # of those, boxes in the ego's free space
    matches: int = 0                   # its confident boxes matched to the reference giving offset_m
    offset_m: float = math.nan         # median distance of the matched pairs (m), NaN below min_matches;
    #                                    the smallest over the ego and the trusted witnesses
    peer_checked: int = 0              # its boxes witnesses' free ranges checked (the ego could not)
    peer_conflicts: int = 0            # of those, boxes in a witness's free space, seen by no other agent

    def llr(self, cfg: ReputationConfig) -> float:
        """Log-likelihood ratio misbehaving vs honest."""
        out = cfg.conflict_llr * self.conflicts - cfg.clear_llr * (self.checked - self.conflicts)
        out += cfg.peer_conflict_llr * self.peer_conflicts - cfg.peer_clear_llr * (self.peer_checked -
                                                                                   self.peer_conflicts)
        if self.matches >= cfg.min_matches and math.isfinite(self.offset_m):
            out += cfg.offset_llr * float(np.clip((self.offset_m - cfg.offset_m) / cfg.offset_scale_m,
                                                  cfg.offset_floor, 2.0))
        return out


def free_space_conflicts(boxes: np.ndarray, velocities: np.ndarray, age_s: float, free_range: np.ndarray,
                         cfg: ReputationConfig) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (N, 7) and velocities (N, 2) m/s in the ego sensor frame at the ego stamp, the input's
    age (s) and the ego scan's free range (B,) m -> (checked (N,) bool, conflict (N,) bool).

    A box conflicts when the ego saw through its centre and the four corners of its footprint
    shrunk to half size, each by ``margin_m`` plus how far the box was moved (speed x age); a
    real object there would have returned the beams at its near face, before its centre."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 7)
    n = len(boxes)
    if n == 0:
        return np.zeros(0, bool), np.zeros(0, bool)
    free = np.asarray(free_range, np.float64)
    shrunk = boxes.copy()
    shrunk[:, 3:5] *= 0.5
    pts = np.concatenate([boxes[:, None, :2], bev_corners(shrunk)], axis=1)     # (N, 5, 2)
    rng = np.hypot(pts[..., 0], pts[..., 1])
    seen = free[azimuth_bins(pts[..., 0], pts[..., 1], len(free))]                  # (N, 5)
    margin = cfg.margin_m + np.linalg.norm(np.asarray(velocities, np.float64).reshape(-1, 2), axis=1) * age_s
    half_diag = 0.5 * np.hypot(boxes[:, 3], boxes[:, 4])
    checked = (rng[:, 0] <= cfg.check_range_m) & (seen[:, 0] >= rng[:, 0] - half_diag - cfg.occluded_m)
    conflict = checked & (seen > rng + margin[:, None]).all(axis=1)
    return checked, conflict


def matched_offset(boxes: np.ndarray, labels: np.ndarray, ego_boxes: np.ndarray, ego_labels: np.ndarray,
                   cfg: ReputationConfig) -> tuple[int, float]:
    """A collaborator's boxes (N, 7) and the ego's (M, 7), ego frame, with their labels -> (pairs
    matched one-to-one, nearest first, same class within match_radius_m; median centre distance
    of the pairs in m, NaN without pairs)."""
    boxes, ego_boxes = np.asarray(boxes).reshape(-1, 7), np.asarray(ego_boxes).reshape(-1, 7)
    if len(boxes) == 0 or len(ego_boxes) == 0:
        return 0, math.nan
    d = np.linalg.norm(boxes[:, None, :2] - ego_boxes[None, :, :2], axis=2)
    d[np.asarray(labels)[:, None] != np.asarray(ego_labels)[None, :]] = np.inf
    pairs = []
    for flat in np.argsort(d, axis=None):
        i, j = divmod(int(flat), d.shape[1])
        if not d[i, j] <= cfg.match_radius_m:
            break
        if np.isfinite(d[i]).any() and np.isfinite(d[:, j]).any():
            pairs.append(d[i, j])
            d[i, :] = np.inf
            d[:, j] = np.inf
    return len(pairs), float(np.median(pairs)) if pairs else math.nan


@dataclass
class Witness:
    """Another collaborator of the same ego frame, testifying about the one judged."""
    agent: object
    boxes: np.ndarray                  # (K, 7) its confident boxes at the ego stamp, ego frame
    labels: np.ndarray                 # (K,)
    free_range: np.ndarray | None      # (B,) m, its profile in its sensor frame; None: no free-space testimony
    T_witness_ego: np.ndarray          # (4, 4) ego sensor frame -> its sensor frame at its stamp
    age_s: float                       # its stamp's age at the ego stamp (s)
    trusted: bool                      # not excluded: its boxes and free space may speak against others


def _into_witness(boxes: np.ndarray, velocities: np.ndarray, w: Witness) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (N, 7) and velocities (N, 2) m/s at the ego stamp, ego frame -> the same at the
    witness's stamp in its sensor frame (moved back by velocity x its age)."""
    T = np.asarray(w.T_witness_ego, np.float64)
    out = transform_boxes(T, np.asarray(boxes, np.float64).reshape(-1, 7))
    vel = rotate_vectors_2d(T, np.asarray(velocities, np.float64).reshape(-1, 2))
    out[:, :2] -= vel * w.age_s
    return out, vel


def _witness_conflicts(boxes: np.ndarray, velocities: np.ndarray, age_s: float, w: Witness,
                       cfg: ReputationConfig) -> tuple[np.ndarray, np.ndarray]:
    """free_space_conflicts of boxes at the ego stamp (ego frame, the input's age) against a
    witness's profile; boxes on the witness's own vehicle are not checked."""
    moved, vel = _into_witness(boxes, velocities, w)
    checked, conflict = free_space_conflicts(moved, vel, age_s + w.age_s, w.free_range,
                                             replace(cfg, margin_m=cfg.peer_margin_m))
    far = np.hypot(moved[:, 0], moved[:, 1]) > cfg.own_radius_m
    return checked & far, conflict & far


def make_witness(agent, boxes, scores, labels, free_range: np.ndarray | None, T_witness_ego: np.ndarray,
                 age_s: float, trusted: bool, ego_boxes, ego_scores, ego_velocities,
                 cfg: ReputationConfig) -> Witness:
    """A collaborator of this ego frame (boxes (K, 7) at the ego stamp in the ego frame, scores,
    labels; its profile (B,) m or None; ego frame -> its sensor frame (4, 4); its age in s;
    whether it is not excluded) as a witness. Its free-space testimony is void when it is not
    trusted or when the ego's confident boxes (N, 7), with their scores and velocities (N, 2) m/s,
    lie in its free space."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 7)
    confident = np.asarray(scores) >= cfg.min_score
    w = Witness(agent, boxes[confident], np.asarray(labels)[confident], free_range if trusted else None,
                T_witness_ego, float(age_s), bool(trusted))
    if w.free_range is not None:
        ego = np.asarray(ego_scores) >= cfg.min_score
        _, conflict = _witness_conflicts(np.asarray(ego_boxes, np.float64).reshape(-1, 7)[ego],
                                         np.asarray(ego_velocities).reshape(-1, 2)[ego], 0.0, w, cfg)
        if conflict.any():
            w.free_range = None
    return w


def consistency_evidence(boxes, scores, labels, velocities, age_s: float, ego_boxes, ego_scores, ego_labels,
                         free_range: np.ndarray | None, cfg: ReputationConfig, witnesses=()) -> Evidence:
    """One collaborator message's boxes at the ego stamp (ego frame: boxes (N, 7), scores (N,),
    labels (N,), velocities (N, 2) m/s; its age in s) against the ego's own boxes of that frame,
    its scan's free range (B,) m (None: no free-space check) and the other collaborators of the
    frame (``Witness``, not the one judged)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 7)
    mine = (np.asarray(scores) >= cfg.min_score) & (np.hypot(boxes[:, 0], boxes[:, 1]) > cfg.own_radius_m)
    boxes, labels = boxes[mine], np.asarray(labels)[mine]
    velocities = np.asarray(velocities).reshape(-1, 2)[mine]
    ev = Evidence()
    checked = np.zeros(len(boxes), bool)
    if free_range is not None:
        checked, conflict = free_space_conflicts(boxes, velocities, age_s, free_range, cfg)
        ev.checked, ev.conflicts = int(checked.sum()), int(conflict.sum())
    ego = np.asarray(ego_scores) >= cfg.min_score
    ego_boxes, ego_labels = np.asarray(ego_boxes).reshape(-1, 7)[ego], np.asarray(ego_labels)[ego]
    ev.matches, ev.offset_m = matched_offset(boxes, labels, ego_boxes, ego_labels, cfg)
    if ev.matches < cfg.min_matches:
        ev.matches, ev.offset_m = 0, math.nan
    _add_testimony(ev, boxes, labels, velocities, age_s, checked, ego_boxes, witnesses, cfg)
    return ev


def _add_testimony(ev: Evidence, boxes: np.ndarray, labels: np.ndarray, velocities: np.ndarray, age_s: float,
                   ego_checked: np.ndarray, ego_boxes: np.ndarray, witnesses, cfg: ReputationConfig) -> None:
    """The witnesses' evidence about confident boxes (N, 7) at the ego stamp (ego frame; labels,
    velocities (N, 2) m/s, the input's age in s), of which the ego checked ``ego_checked`` (N,)
    itself: free-space conflicts of the boxes no other agent (the ego's confident ``ego_boxes``
    (M, 7) or a witness's) reports within corroborate_m, and a smaller matched offset."""
    seen = np.zeros(len(boxes), bool)
    for xy in (ego_boxes[:, :2], *(w.boxes[:, :2] for w in witnesses)):
        if len(xy) and len(boxes):
            seen |= np.linalg.norm(boxes[:, None, :2] - xy[None], axis=2).min(1) < cfg.corroborate_m
    checked, conflict = np.zeros(len(boxes), bool), np.zeros(len(boxes), bool)
    for w in witnesses:
        if w.free_range is not None and len(boxes):
            c, x = _witness_conflicts(boxes, velocities, age_s, w, cfg)
            checked |= c & ~ego_checked
            conflict |= x & ~ego_checked
        if w.trusted:
            n, offset = matched_offset(boxes, labels, w.boxes, w.labels, cfg)
            if n >= cfg.min_matches and not offset >= ev.offset_m:   # NaN: none yet
                ev.matches, ev.offset_m = n, offset
    ev.peer_checked, ev.peer_conflicts = int(checked.sum()), int((conflict & ~seen).sum())


@dataclass
class _AgentReputation:
    suspicion: float = 0.0
    stamp_ns: int | None = None        # the newest message taken as evidence
    time_ns: int | None = None         # ego time of the last update
    messages: int = 0
    last: Evidence = field(default_factory=Evidence)


class Reputation:
    """Reputation of every collaborator; state per agent, forgotten with it."""

    def __init__(self, cfg: ReputationConfig | None = None):
        self.cfg = cfg or ReputationConfig()
        self._agents: dict = {}
        self._cap = self.cfg.evidence_to_exclude / (1.0 - self.cfg.exclude_below)

    def seen(self, agent, stamp_ns: int) -> bool:
        """Whether the message of ``agent`` stamped ``stamp_ns`` (or a newer one) was taken."""
        state = self._agents.get(agent)
        return state is not None and state.stamp_ns is not None and int(stamp_ns) <= state.stamp_ns

    def observe(self, agent, stamp_ns: int, now_ns: int, evidence: Evidence) -> None:
        """Add the evidence of one new message of ``agent`` (its stamp) at ego time ``now_ns``."""
        state = self._agents.setdefault(agent, _AgentReputation())
        if state.time_ns is not None and now_ns > state.time_ns:
            state.suspicion *= math.exp(-(now_ns - state.time_ns) / NS_PER_S / self.cfg.decay_s)
        state.suspicion = float(np.clip(state.suspicion + evidence.llr(self.cfg), 0.0, self._cap))
        state.stamp_ns, state.time_ns, state.last = int(stamp_ns), int(now_ns), evidence
        state.messages += 1

    def value(self, agent) -> float:
        """Reputation in [0, 1]; 1 for an agent without evidence."""
        state = self._agents.get(agent)
        if state is None:
            return 1.0
        return float(max(0.0, 1.0 - (1.0 - self.cfg.exclude_below) * state.suspicion / self.cfg.evidence_to_exclude))

    def excluded(self, agent) -> bool:
        return self.value(agent) < self.cfg.exclude_below

    def forget(self, agent) -> None:
        self._agents.pop(agent, None)

    def clear(self) -> None:
        self._agents.clear()

    def agents(self) -> list:
        return list(self._agents)

    def summary(self, agent) -> dict | None:
        """JSON-ready state of ``agent`` (None without evidence): reputation, whether excluded,
        messages judged and the last message's evidence."""
        state = self._agents.get(agent)
        if state is None:
            return None
        ev = state.last
        return {'reputation': round(self.value(agent), 4), 'excluded': self.excluded(agent),
                'messages': state.messages, 'checked': ev.checked, 'conflicts': ev.conflicts,
                'peer_checked': ev.peer_checked, 'peer_conflicts': ev.peer_conflicts,
                'matches': ev.matches, 'offset_m': None if math.isnan(ev.offset_m) else round(ev.offset_m, 3)}
