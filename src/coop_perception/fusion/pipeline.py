"""`CooperativeDetector`: the per-frame cooperative detector used by offline evaluation and by the
ROS fusion node alike (one code path).

Feed it, as they arrive, the ego's scans (or their detector output), collaborators' inputs
(the payload type of the method in ``fusion.methods.METHODS``: feature messages, box lists or raw
points) and everyone's poses, all with their capture stamps (int ns); then ask `detect(ego_stamp_ns)`. For each
collaborator the newest input not newer than the ego stamp and not older than `max_age_s` is used;
a missing collaborator is simply absent. Bad or unusable inputs are dropped, logged once per reason
and counted in `drops`.

State is bounded (docs/architecture.md §5.1): a collaborator silent for `forget_after_s` of ego time
is forgotten, at most `max_agents` are tracked, and one stale ego message is dropped while a
confirmed jump back of the ego's time empties every buffer.
"""
from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ..bev_grid import BevGrid
from ..data.objects import make_objects
from ..detection.decode import Detections, corner_variance, rotated_nms
from ..geometry import bev_iou, invert_pose, rotate_vectors_2d, transform_points
from .align import warp_boxes, warp_to_ego
from .codec import FeatureMessage, make_message, message_uncertainty
from .compact_codec import compact_message
from .methods import GATE, LEARNED, method_named
from .model import FusionModel, fuse_sparse
from .motion import VelocityTracker, VelocityTrackerConfig
from .payloads import BoxList, RawPoints
from .pose_buffer import NS_PER_S, BackJump, PoseBufferConfig, PoseBuffers, PoseLookupError
from .reputation import Reputation, ReputationConfig, consistency_evidence, make_witness
from .roi_boxes import decode_roi_boxes, roi_peaks
from .sharing import DEFAULT_SHARING, SHARING_FORMATS, select_roi_cells, select_roi_peaks
from .trust import ROI_ATTRIBUTES, FlatTrust, ThresholdTrust, roi_attributes
from .velocity_lending import LendingConfig, lend_velocities

log = logging.getLogger(__name__)
BOX_CHOICES = ('score', 'precise', 'average')
# FusedDetections.sources are int64 bit masks over the frame's contributors: agent k has bit k
# when 0 <= k < SOURCE_BITS (what readers of the mask have always assumed), any other agent id a
# bit no contributor of the frame uses (FusedDetections.agent_bits). 63 bits hold the ego and this
# many collaborators, the newest inputs of a frame (feature methods fuse at most
# CooperativeConfig.slots anyway).
SOURCE_BITS = 63
MAX_COLLABORATORS = SOURCE_BITS - 1
# Ego poses held back while a jump back of the ego's time is unconfirmed: odometry at 50 Hz over
# time_jump_confirm frames at 10 Hz, with room to spare.
HELD_POSES = 64


@dataclass
class CooperativeConfig:
    method: str = 'trust'                  # a name in fusion.methods.METHODS
    max_age_s: float = 1.0                 # collaborator inputs older than this are ignored
    slots: int = 4                         # collaborators fused per frame (newest first)
    roi_policy: dict = field(default_factory=dict)   # sharing.select_roi_cells keyword arguments
    late_nms_iou: float = 0.2              # NMS between merged box sets (late, and ROI boxes)
    # trust/gate: also decode each collaborator's ROIs in its own grid (fusion.roi_boxes) and
    # merge them, trust-weighted, with the boxes of the fused map
    roi_boxes: bool = True
    # length, width (m) of the ego vehicle around its sensor: boxes centred inside are the ego
    # itself as collaborators (or early fusion's points) see it; None keeps them
    own_footprint_m: tuple[float, float] | None = (5.0, 2.4)
    history: int = 20                      # inputs kept per collaborator
    # Bounded state: a collaborator not heard from (inputs or poses) for this long in ego time
    # (the newest ego frame stamp) is forgotten (inputs, poses); never sooner than max_age_s.
    forget_after_s: float = 5.0
    # collaborators tracked at once; a new one beyond evicts the longest-silent (drops['agent_evicted'])
    max_agents: int = 64
    # An ego frame stamped this far (s) behind the newest one is stale (dropped, counted), unless
    # time_jump_confirm of them in a row, each within this of the one before, confirm that the
    # ego's time restarted (a looping bag): then every buffer is emptied and they are kept.
    time_jump_back_s: float = 0.5
    time_jump_confirm: int = 3
    # boxes of one object from several sources (NMS at late_nms_iou): 'score' keeps the
    # highest-scoring box; 'precise' keeps its score but takes the geometry of the box whose
    # predicted corner variance (aleatoric, grown with the input's age) is smallest, where the
    # sources report one (the fused map's and the ROI boxes; late fusion's box lists do not);
    # 'average' takes the mean of that box and the members overlapping it by more than
    # average_iou, weighted by score / variance (score alone where no variance is reported)
    box_choice: str = 'average'
    average_iou: float = 0.5
    velocity_std: float = 0.5              # m/s: how fast a moved box's position error grows with age
    gate: dict | None = None               # ThresholdTrust settings of methods that need a gate
    # misbehaving collaborators (fusion.reputation): per-agent consistency with the ego's view
    reputation: ReputationConfig = field(default_factory=ReputationConfig)
    # a collaborator's object whose sender does not know its velocity borrows the velocity of the
    # same object as another source tracks it (fusion.velocity_lending); methods with motion compensation
    lending: LendingConfig = field(default_factory=LendingConfig)

    def __post_init__(self):
        method_named(self.method)
        if self.max_agents < 1 or self.time_jump_confirm < 1:
            raise ValueError(f'max_agents and time_jump_confirm must be >= 1, got {self.max_agents}, '
                             f'{self.time_jump_confirm}')
        if not (self.forget_after_s > 0 and self.time_jump_back_s > 0):
            raise ValueError(f'forget_after_s and time_jump_back_s must be > 0, got {self.forget_after_s}, '
                             f'{self.time_jump_back_s}')
        if self.box_choice not in BOX_CHOICES:
            raise ValueError(f'box_choice must be one of {", ".join(BOX_CHOICES)}, got {self.box_choice!r}')


@dataclass
class FusedDetections:
    """Detections in the ego sensor frame at the ego stamp."""
    boxes: np.ndarray          # (N, 7)
    scores: np.ndarray         # (N,)
    labels: np.ndarray         # (N,)
    velocities: np.ndarray     # (N, 2) m/s
    trust: np.ndarray          # (N,) collaborator trust at the box centre (0: ego evidence only)
    sources: np.ndarray        # (N,) int64 bit mask of contributing agents (see agent_bits)
    stamp_ns: int
    ages_s: dict               # collaborator -> age (s) of the input used
    timings_ms: dict = field(default_factory=dict)   # per stage of the fusion (ms), 'total'
    # agent -> its bit in ``sources`` for every contributor of the frame; empty: bit k = agent k
    agent_bits: dict = field(default_factory=dict)

    def _agent_of_bit(self) -> dict:
        if self.agent_bits:
            return {bit: agent for agent, bit in self.agent_bits.items()}
        return {k: k for k in range(SOURCE_BITS)}

    def contributed(self, agent) -> np.ndarray:
        """(N,) bool: the boxes ``agent`` contributed to."""
        bit = self.agent_bits.get(agent) if self.agent_bits else agent
        if not isinstance(bit, (int, np.integer)) or not 0 <= bit < SOURCE_BITS:
            return np.zeros(len(self.boxes), bool)
        return (np.asarray(self.sources, np.int64) >> int(bit)) & 1 == 1

    def contributors(self, i: int) -> list:
        """The agents that contributed to box ``i``, by bit."""
        mask = int(self.sources[i])
        return [agent for bit, agent in sorted(self._agent_of_bit().items()) if mask >> bit & 1]

    def to_objects(self) -> np.ndarray:
        """Object-list records (data.objects), the layout of ``/coop/objects``. ``source`` is the
        agent when a single one contributed, -1 when several did (``contributors`` names them)."""
        names = self._agent_of_bit()
        source = [names.get(int(m).bit_length() - 1, -1) if m > 0 and m & (m - 1) == 0 else -1
                  for m in np.asarray(self.sources, np.int64).tolist()]
        return make_objects(self.boxes, self.velocities, score=self.scores, label=self.labels,
                            trust=self.trust, source=np.asarray(source, np.int64).reshape(-1))


def source_bits(agents) -> dict:
    """Distinct agents (at most SOURCE_BITS) -> their bit in FusedDetections.sources: k for an
    integer id 0 <= k < SOURCE_BITS, the lowest bits no other of them uses for the rest."""
    own = {a: int(a) for a in agents if isinstance(a, (int, np.integer)) and 0 <= a < SOURCE_BITS}
    free = iter(sorted(set(range(SOURCE_BITS)) - set(own.values())))
    return {a: own[a] if a in own else next(free) for a in agents}


def collaborator_message(det: Detections, agent, stamp_ns: int, roi_policy: dict | None = None) -> FeatureMessage:
    """What a collaborator puts on the air for one scan: its ROI cells, or with ``roi_policy``
    ``format: compact`` one record per ROI (fusion.compact_codec) as the receiver decodes it."""
    policy = dict(roi_policy or {})
    layout = policy.pop('format', DEFAULT_SHARING)
    if layout not in SHARING_FORMATS:
        raise ValueError(f'sharing format must be one of {", ".join(SHARING_FORMATS)}, got {layout!r}')
    if layout == 'compact':
        return compact_message(det, select_roi_peaks(det, **policy), agent, stamp_ns, det.features.shape[0])
    return make_message(det, select_roi_cells(det, **policy), agent, stamp_ns)


class Sender:
    """A collaborator's side: replaces the detector's velocities by velocities tracked over its own
    scans (fusion.motion), the detector's own among the measurements where it measures them (several
    sweeps); the receiver's motion compensation relies on them."""

    def __init__(self, tracker: VelocityTrackerConfig | None = None):
        self.tracker = VelocityTracker(tracker)

    def prepare(self, det: Detections, T_world_sensor: np.ndarray, stamp_ns: int) -> Detections:
        """Call once per scan, in capture order."""
        vel, std = self.tracker.update(det.boxes, det.labels, T_world_sensor, stamp_ns, det.velocities,
                                       det.velocity_std)
        return replace(det, velocities=vel.astype(np.float32), velocity_std=std.astype(np.float32))


class CooperativeDetector:
    def __init__(self, detector, ego_id, cfg: CooperativeConfig | None = None,
                 fusion_model: FusionModel | None = None, pose_config: PoseBufferConfig | None = None):
        self.detector = detector
        self.ego_id = ego_id
        self.cfg = cfg or CooperativeConfig()
        self.method = method_named(self.cfg.method)
        if self.method.needs_fusion_model and fusion_model is None:
            raise ValueError(f"method '{self.method.name}' needs a trained fusion model")
        if self.method.needs_gate and not self.cfg.gate:
            raise ValueError(f"method '{self.method.name}' needs calibrated thresholds (CooperativeConfig.gate)")
        self.gate = ThresholdTrust.from_dict(self.cfg.gate) if self.cfg.gate else None
        self.fusion = fusion_model.eval() if fusion_model is not None else None
        # the trust modulus of the method's collaborator ROI boxes; for the learned method, the
        # calibrated box trust of its checkpoint where it has one, which replaces the boxes' scores
        # (its own and the fused map's) by probabilities of a true positive
        self.roi_trust = {LEARNED: self.fusion and self.fusion.trust, GATE: self.gate,
                          None: FlatTrust()}[self.method.trust]
        self.box_trust = self.fusion.box_trust if self.fusion is not None and self.method.trust == LEARNED else None
        self.poses = PoseBuffers(pose_config)
        # drops and _warned are keyed by reason, a fixed set of strings: they stay small
        self.drops: Counter = Counter()
        self._warned: set = set()
        self._ego_time = BackJump(round(self.cfg.time_jump_back_s * NS_PER_S), self.cfg.time_jump_confirm)
        self._forget_ns = round(max(self.cfg.forget_after_s, self.cfg.max_age_s) * NS_PER_S)
        self.resets = 0        # times every buffer was emptied (reset, restart_time, a confirmed jump)
        self.forgotten = 0     # collaborators forgotten after forget_after_s of silence
        self.velocities_lent = 0  # collaborator objects given another source's velocity (_lent)
        self.reputation = Reputation(self.cfg.reputation)
        self.reputation_on = self.cfg.reputation.on_for(self.method.name) and self.method.payload is not RawPoints
        self._scale: dict = {}   # agent -> its reputation, for the frame being fused
        self._stage_ms: dict = {}  # wall time of lending and reputation in the frame being fused
        self._frame_roi_boxes: dict = {}  # (agent, stamp) -> RoiBoxes decoded for the frame being fused, the ego's too
        self._clear()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget every buffered input, every collaborator and the ego's time (e.g. after the clock
        jumped back)."""
        self._clear()
        self.resets += 1

    def _clear(self) -> None:
        self._ego: dict[int, tuple[Detections, np.ndarray | None]] = {}
        self._inputs: dict = defaultdict(dict)   # agent -> {stamp_ns: input}
        # collaborator -> [when last heard from (ns, ego time), messages heard]
        self._heard: dict = {}
        # ego poses far behind the ego's time, kept until a jump is confirmed: (stamp ns, (4, 4))
        self._held_poses: list[tuple[int, np.ndarray]] = []
        self.reputation.clear()
        for agent in self.poses.agents():
            if agent != self.ego_id:
                self.poses.forget(agent)
        self.poses.reset()
        self._ego_time.reset()

    def restart_time(self) -> None:
        """The clock jumped back (e.g. /clock of a looping bag): empty every buffer, but keep the
        ego poses and frames held back as stale, which belong to the new time."""
        held_poses, held_frames = self._held_poses, self._ego_time.held()
        self.reset()
        self._replay(held_poses, held_frames)

    @property
    def ego_time_ns(self) -> int | None:
        """The ego's time: the newest ego frame stamp (ns) since the last reset, None before one."""
        return self._ego_time.newest_ns

    def tracked_agents(self) -> list:
        """The collaborators with state here."""
        return list(self._heard)

    def _heard_from(self, agent, stamp: int) -> None:
        """Note a message of ``agent``; a new agent beyond max_agents evicts the longest-silent
        one. Agents heard within max_age_s (whose inputs may still be fused) count as equally
        silent, and among them the one heard least often goes: a burst of new ids (churn or a
        flood) evicts its own kind before the regular collaborators. A message is heard at the
        ego's time, or at its own stamp where that is later (an ego frame may still be on its way),
        but never more than forget_after_s later."""
        heard = self._heard.get(agent)
        if heard is None and len(self._heard) >= self.cfg.max_agents:
            oldest = min(self._heard, key=self._eviction_order)
            self._forget(oldest)
            self._drop('agent_evicted', f'more than {self.cfg.max_agents} collaborators: forgot agent {oldest}')
        now = self._ego_time.newest_ns
        when = stamp if now is None else max(now, min(stamp, now + self._forget_ns))
        self._heard[agent] = [when, 1 if heard is None else heard[1] + 1]

    def _eviction_order(self, agent) -> tuple:
        t, count = self._heard[agent]
        now = self._ego_time.newest_ns
        if now is not None and now - t <= self.cfg.max_age_s * NS_PER_S:
            t = now
        return t, count

    def _forget(self, agent) -> None:
        self._heard.pop(agent, None)
        self.reputation.forget(agent)
        self._inputs.pop(agent, None)
        self.poses.forget(agent)

    def _forget_silent(self) -> None:
        """Forget the collaborators silent for longer than forget_after_s (ego time)."""
        now = self._ego_time.newest_ns
        for agent in [a for a, (t, _) in self._heard.items() if now - t > self._forget_ns]:
            self._forget(agent)
            self.forgotten += 1

    def _drop(self, reason: str, detail: str = '') -> None:
        self.drops[reason] += 1
        if reason not in self._warned:
            self._warned.add(reason)
            log.warning('dropped input (%s)%s; further drops of this kind are only counted', reason,
                        f': {detail}' if detail else '')

    # ------------------------------------------------------------------ inputs
    def add_pose(self, agent, stamp_ns: int, T_world_sensor: np.ndarray) -> bool:
        """Add a pose (4, 4) of ``agent`` at ``stamp_ns``; return whether it was taken. An ego pose
        far behind the ego's time is held back as stale (drops['stale_ego_stamp'])."""
        stamp = int(stamp_ns)
        if agent == self.ego_id:
            now = self._ego_time.newest_ns
            if now is not None and stamp < now - self._ego_time.jump_ns:
                self._held_poses = self._held_poses[-HELD_POSES + 1:] + [(stamp, T_world_sensor)]
                self._drop('stale_ego_stamp', f'ego pose {(now - stamp) / NS_PER_S:.2f} s behind the ego frames')
                return False
        else:
            self._heard_from(agent, stamp)
        try:
            self.poses.insert(agent, stamp, T_world_sensor)
        except ValueError as exc:
            self._drop('bad_pose', str(exc))
            return False
        return True

    def add_ego_scan(self, stamp_ns: int, points: np.ndarray) -> Detections:
        det = self.detector.detect(points)
        self.add_ego_detections(stamp_ns, det, points if self.method.payload is RawPoints else None)
        return det

    def add_ego_detections(self, stamp_ns: int, det: Detections, points: np.ndarray | None = None) -> bool:
        """The ego's frame captured at stamp_ns; return whether it can be fused (``detect``). A
        frame far behind the ego's time is stale (dropped, counted) unless it confirms a jump
        back of the ego's time (CooperativeConfig.time_jump_confirm), which empties every buffer
        first (``resets``)."""
        stamp = int(stamp_ns)
        verdict, held = self._ego_time.observe(stamp, (stamp, (det, points)))
        if verdict == BackJump.STALE:
            self._drop('stale_ego_stamp', f'ego frame {(self._ego_time.newest_ns - stamp) / NS_PER_S:.2f} s behind '
                                          'the newest')
            return False
        if verdict == BackJump.JUMP:
            log.info('the ego time jumped back to %d ns: emptying every buffer', stamp)
            held_poses = self._held_poses
            self.reset()
            self._replay(held_poses, held)
            return True
        self._held_poses = []
        self._store_frame(stamp, (det, points))
        return True

    def _store_frame(self, stamp: int, entry) -> None:
        self._ego[stamp] = entry
        for old in sorted(self._ego)[:-self.cfg.history]:
            del self._ego[old]
        self._forget_silent()

    def _replay(self, poses: list, frames: list) -> None:
        """Put back the ego poses and frames of the new time after a jump back."""
        for stamp, entry in frames:
            self._ego_time.observe(stamp)
            self._store_frame(stamp, entry)
        for stamp, T in poses:
            self.add_pose(self.ego_id, stamp, T)

    def add_ego_map(self, stamp_ns: int, features: np.ndarray, sensor_height: float,
                    free_range: np.ndarray | None = None, message: FeatureMessage | None = None) -> bool:
        """The ego's BEV features (C, H, W) of the frame captured at stamp_ns, without boxes (e.g.
        from its detector node): the head runs on them only when no collaborator contributes;
        otherwise it runs once, on the fused map. For the reputation's checks: ``free_range`` (B,)
        m, the scan's free-range profile (detection.free_range), and ``message``, the map as
        received (fusion.ego_map.decode_ego_message), whose ROIs give the ego's boxes cheaply."""
        return self.add_ego_detections(stamp_ns, _EgoMap(features, self.detector.grid(), float(sensor_height),
                                                         free_range, message))

    def _ego_boxes(self, entry) -> Detections:
        if isinstance(entry, _EgoMap):
            return self.detector.detect_from_features(entry.features, entry.sensor_height, mc_passes=0)
        return entry

    def add_input(self, agent, stamp_ns: int, item, replace: bool = False) -> None:
        """A collaborator's payload captured at stamp_ns: an instance of the method's payload type
        (FeatureMessage, BoxList or RawPoints); anything else is dropped. A second input with the
        same stamp is dropped as a duplicate, unless ``replace`` (a diagnosis oracle that rewrote
        it, eval.delay_diagnosis)."""
        if agent == self.ego_id:
            self._drop('ego_as_collaborator', f'agent {agent} is the ego')
            return
        payload = self.method.payload
        if payload is None:   # the ego alone: collaborators' inputs are not used
            return
        if not isinstance(item, payload):
            self._drop('wrong_input_kind', f'{self.method.name} fusion takes {payload.__name__}, agent {agent} '
                                           f'sent {type(item).__name__}')
            return
        if self.method.sharing == 'cells' and getattr(item, 'boxes', None) is not None:
            self._drop('needs_cells', f'{self.method.name} fusion fuses feature cells; agent {agent} sends '
                                      f'compact records without them (its roi.format)')
            return
        self._heard_from(agent, int(stamp_ns))
        buf = self._inputs[agent]
        if int(stamp_ns) in buf and not replace:
            self._drop('duplicate_input', f'agent {agent} sent a second input stamped {int(stamp_ns)}')
            return
        buf[int(stamp_ns)] = item
        for old in sorted(buf)[:-self.cfg.history]:
            del buf[old]

    def _select(self, agent, ego_stamp: int):
        """Newest input of `agent` not newer than the ego stamp and within max_age."""
        buf = self._inputs.get(agent, {})
        stamps = [s for s in buf if s <= ego_stamp]
        if not stamps:
            if buf:
                self._drop('future', f'agent {agent} has only inputs newer than the ego frame')
            return None
        stamp = max(stamps)
        if (ego_stamp - stamp) / NS_PER_S > self.cfg.max_age_s:
            self._drop('stale', f'agent {agent} input is {(ego_stamp - stamp) / NS_PER_S:.2f} s old')
            return None
        try:
            pose = self.poses.lookup(agent, stamp)
        except PoseLookupError as exc:
            self._drop('no_pose', str(exc))
            return None
        return stamp, buf[stamp], pose

    # ------------------------------------------------------------------ fusion
    def detect(self, ego_stamp_ns: int) -> FusedDetections | None:
        """Fused detections for the ego frame captured at ego_stamp_ns (None if that frame is
        unknown). Without an ego pose at that stamp (an odometry gap) no collaborator can be
        placed: the ego's own detections (drops['ego_pose_unknown'])."""
        ego_stamp = int(ego_stamp_ns)
        if ego_stamp not in self._ego:
            self._drop('no_ego_frame', f'no ego scan at {ego_stamp}')
            return None
        det, ego_points = self._ego[ego_stamp]
        try:
            T_ego = self.poses.lookup(self.ego_id, ego_stamp)
        except PoseLookupError as exc:
            self._drop('ego_pose_unknown', str(exc))
            T_ego = None
        chosen = self._chosen(ego_stamp) if T_ego is not None else {}
        self._frame_roi_boxes = {}
        self._stage_ms = {}
        chosen = self._lent(det, chosen, T_ego, ego_stamp)
        chosen = self._vetted(det, chosen, T_ego, ego_stamp)
        ages = {a: (ego_stamp - s) / NS_PER_S for a, (s, _, _) in chosen.items()}
        agent_bits = source_bits((self.ego_id, *chosen))
        bits = {a: 1 << b for a, b in agent_bits.items()}
        payload = self.method.payload
        if not chosen:
            det = self._ego_boxes(det)
            out = self._wrap(det, np.zeros(len(det.boxes)), np.full(len(det.boxes), bits[self.ego_id], np.int64),
                             ego_stamp, ages)
        elif payload is BoxList:
            out = self._late(self._ego_boxes(det), chosen, T_ego, ego_stamp, ages, bits)
        elif payload is RawPoints:
            out = self._early(self._ego_boxes(det), ego_points, chosen, T_ego, ego_stamp, ages, bits)
        else:
            out = self._intermediate(det, chosen, T_ego, ego_stamp, ages, bits)
        out.agent_bits = agent_bits
        self._add_stage_times(out)
        return self._without_own_vehicle(out)

    def _chosen(self, ego_stamp: int) -> dict:
        """agent -> (stamp, input, pose) of every usable collaborator, at most MAX_COLLABORATORS
        (the newest inputs), in the order of their agent ids as strings."""
        chosen = {}
        for agent in sorted(self._inputs, key=str):
            picked = self._select(agent, ego_stamp)
            if picked is not None:
                chosen[agent] = picked
        if len(chosen) > MAX_COLLABORATORS:
            newest = sorted(chosen, key=lambda a: (-chosen[a][0], str(a)))[:MAX_COLLABORATORS]
            self._drop('too_many_collaborators', f'{len(chosen)} collaborators, {MAX_COLLABORATORS} fused per frame')
            chosen = {a: chosen[a] for a in chosen if a in newest}
        return chosen

    def _roi_box_scores(self, rb) -> tuple[np.ndarray, np.ndarray]:
        """A message's ROI boxes (fusion.roi_boxes.RoiBoxes) at the ego stamp -> (n,) trust and
        (n,) scores: the calibrated box trust's probability, else the score times the trust."""
        if self.box_trust is not None:
            t = self.box_trust.trust(rb.attributes)
            return t, t.astype(np.float32)
        t = self.roi_trust.trust(rb.attributes)
        return t, rb.scores * t

    def _fused_map_scores(self, out: Detections) -> np.ndarray:
        """(n,) scores of the fused map's boxes, on the scale of the ROI boxes they compete with:
        with a calibrated box trust, its probability of a true positive (age 0, not moved, at its
        range from the ego)."""
        if self.box_trust is None:
            return out.scores
        attributes = roi_attributes(out.scores, message_uncertainty(out.uncertainty, out.boxes), 0.0, 0.0,
                                    np.hypot(out.boxes[:, 0], out.boxes[:, 1]))
        return self.box_trust.trust(attributes).astype(np.float32)

    def _without_own_vehicle(self, out: FusedDetections) -> FusedDetections:
        """Collaborators see the ego's own vehicle; a box centred on its footprint is the ego."""
        if self.cfg.own_footprint_m is None:
            return out
        half = np.asarray(self.cfg.own_footprint_m, np.float64) / 2
        own = (np.abs(out.boxes[:, 0]) < half[0]) & (np.abs(out.boxes[:, 1]) < half[1])
        if not own.any():
            return out
        keep = ~own
        return replace(out, boxes=out.boxes[keep], scores=out.scores[keep], labels=out.labels[keep],
                       velocities=out.velocities[keep], trust=np.asarray(out.trust)[keep],
                       sources=np.asarray(out.sources)[keep])

    def _wrap(self, det, trust, sources, stamp, ages) -> FusedDetections:
        return FusedDetections(det.boxes, det.scores, det.labels, det.velocities, trust, sources, stamp, ages)

    def _late(self, det, chosen, T_ego, ego_stamp, ages, bits) -> FusedDetections:
        parts = [_Part(det.boxes, det.scores, det.labels, det.velocities, 0.0, bits[self.ego_id])]
        for agent, (stamp, item, pose) in chosen.items():
            boxes, vel = warp_boxes(item.boxes, item.velocities, pose, T_ego, stamp, ego_stamp,
                                    motion_compensation=self.method.motion_compensation)
            parts.append(_Part(boxes, item.scores, item.labels, vel, 1.0, bits[agent]))
        return self._merge(self._scaled_parts(parts, bits), ego_stamp, ages)

    def _merge(self, parts: list['_Part'], ego_stamp: int, ages: dict) -> FusedDetections:
        """Class-wise rotated NMS over every part's boxes; the higher score leads, the geometry is
        chosen or averaged per ``box_choice``."""
        n = [len(p.boxes) for p in parts]
        boxes = np.concatenate([np.asarray(p.boxes, np.float64).reshape(-1, 7) for p in parts])
        scores = np.concatenate([p.scores for p in parts]).astype(np.float32)
        labels = np.concatenate([p.labels for p in parts]).astype(np.int64)
        vel = np.concatenate([np.asarray(p.velocities, np.float32).reshape(-1, 2) for p in parts])
        trust = np.concatenate([np.broadcast_to(np.asarray(p.trust, np.float64), k) for p, k in zip(parts, n)])
        sources = np.concatenate([np.broadcast_to(np.asarray(p.sources, np.int64), k) for p, k in zip(parts, n)])
        if self.cfg.box_choice != 'score':
            variance = np.concatenate([np.broadcast_to(np.asarray(p.variance, np.float64), k)
                                       for p, k in zip(parts, n)])
            average_iou = self.cfg.average_iou if self.cfg.box_choice == 'average' else None
            keep, clusters, overlaps = _cluster_nms(boxes, scores, labels, self.cfg.late_nms_iou)
            geometry, ref = _cluster_geometry(boxes, scores, variance, clusters, overlaps, average_iou)
            boxes[keep], vel[keep] = geometry, vel[ref]
        else:
            keep = [idx[rotated_nms(boxes[idx], scores[idx], self.cfg.late_nms_iou)]
                    for idx in (np.flatnonzero(labels == k) for k in np.unique(labels))]
            keep = np.concatenate(keep) if keep else np.zeros(0, np.int64)
        keep = keep[np.argsort(-scores[keep], kind='stable')]
        return FusedDetections(boxes[keep], scores[keep], labels[keep], vel[keep], trust[keep], sources[keep],
                               ego_stamp, ages)

    def _early(self, det, ego_points, chosen, T_ego, ego_stamp, ages, bits) -> FusedDetections:
        mask = bits[self.ego_id]
        if ego_points is None:
            self._drop('no_ego_points', 'early fusion needs the ego scan (add_ego_scan or points=)')
            return self._wrap(det, np.zeros(len(det.boxes)), np.full(len(det.boxes), mask, np.int64), ego_stamp, ages)
        clouds = [np.asarray(ego_points, np.float32)[:, :4]]
        T_ego_world = invert_pose(T_ego)
        for agent, (_, item, pose) in chosen.items():
            clouds.append(transform_points(T_ego_world @ pose, np.asarray(item.points, np.float32)[:, :4]))
            mask |= bits[agent]
        fused = self.detector.detect(np.concatenate(clouds), sensor_height=det.sensor_height)
        return self._wrap(fused, np.ones(len(fused.boxes)), np.full(len(fused.boxes), mask, np.int64), ego_stamp,
                          ages)

    def _intermediate(self, det, chosen, T_ego, ego_stamp, ages, bits) -> FusedDetections:
        method = self.method
        clock = _StageClock()
        warped, agents = [], []
        for agent, (stamp, item, pose) in sorted(chosen.items(), key=lambda kv: -kv[1][0]):
            warped.append(warp_to_ego(item, pose, T_ego, det.grid, ego_stamp,
                                      motion_compensation=method.motion_compensation))
            agents.append(agent)
        self._scale_cells(warped, agents)
        clock.lap('warp')
        with torch.inference_mode():
            fused, trust = fuse_sparse(det.features, warped, method, self.cfg.slots, self.fusion, self.gate)
        clock.lap('fusion')
        out = self.detector.detect_from_features(fused[0], det.sensor_height)
        clock.lap('head_decode')
        rows, cols = det.grid.cells_of(out.boxes[:, 0], out.boxes[:, 1], clip=True)
        box_trust = trust[:, rows, cols] if len(rows) else np.zeros((len(trust), 0))
        sources = np.full(len(out.boxes), bits[self.ego_id], np.int64)
        for i, agent in enumerate(agents[:self.cfg.slots]):
            sources |= np.where(box_trust[i] > 0, bits[agent], 0)
        fused_trust = box_trust.max(0) if len(agents) else np.zeros(len(out.boxes))
        if not (method.roi_boxes and self.cfg.roi_boxes):
            result = self._wrap(out, fused_trust, sources, ego_stamp, ages)
        else:
            parts = [_Part(out.boxes, self._fused_map_scores(out), out.labels, out.velocities, fused_trust, sources,
                           corner_variance(out.uncertainty, out.boxes))]
            for agent, (stamp, item, pose) in chosen.items():
                if agent in agents[:self.cfg.slots]:
                    rb = self._roi_boxes(agent, stamp, item, pose, T_ego, ego_stamp, det.sensor_height)
                    t, score = self._roi_box_scores(rb)
                    variance = rb.attributes[:, ROI_ATTRIBUTES.index('reg_aleatoric')] + (
                        self.cfg.velocity_std * ages[agent]) ** 2
                    parts.append(_Part(rb.boxes, score, rb.labels, rb.velocities, t, bits[agent], variance))
            clock.lap('roi_boxes')
            result = self._merge(self._scaled_parts(parts, bits), ego_stamp, ages)
            clock.lap('merge')
        result.timings_ms = clock.ms()
        return result

    # ------------------------------------------------------------------ velocity lending
    def _lent(self, entry, chosen: dict, T_ego, ego_stamp: int) -> dict:
        """``chosen`` with each collaborator object whose sender does not know its velocity given
        the velocity of the same object as the ego or another collaborator tracks it
        (fusion.velocity_lending; ``velocities_lent`` counts the objects)."""
        if not (self.cfg.lending.enabled and self.method.motion_compensation and chosen):
            return chosen
        start = time.perf_counter()
        try:
            return self._lend(entry, chosen, T_ego, ego_stamp)
        finally:
            self._stage_ms['lending'] = (time.perf_counter() - start) * 1e3

    def _lend(self, entry, chosen: dict, T_ego, ego_stamp: int) -> dict:
        agents = list(chosen)
        views = [self._lending_view(entry, T_ego, ego_stamp)] + [
            self._lending_view(item, T_ego, ego_stamp, agent, stamp, pose, entry.sensor_height)
            for agent, (stamp, item, pose) in chosen.items()]
        count = [len(v[0]) for v in views]
        source = np.repeat(np.arange(len(views)), count)
        ages = np.repeat([0.0] + [(ego_stamp - chosen[a][0]) / NS_PER_S for a in agents], count)
        boxes, scores, labels, velocities, std = (np.concatenate(parts) for parts in zip(*views))
        donor = lend_velocities(boxes[:, :2], velocities, std, labels, scores, ages, source, source > 0,
                                self.cfg.lending)
        out = dict(chosen)
        starts = np.cumsum(count)[:-1]
        for i, agent in enumerate(agents):
            rows = donor[starts[i]:starts[i] + count[i + 1]]
            lent = rows >= 0
            if lent.any():
                stamp, item, pose = chosen[agent]
                out[agent] = (stamp, self._with_lent(agent, stamp, item, pose, T_ego, lent, velocities[rows[lent]],
                                                     std[rows[lent]], ages[starts[i]]), pose)
                self.velocities_lent += int(lent.sum())
        return out

    def _lending_view(self, item, T_ego, ego_stamp: int, agent=None, stamp: int | None = None, pose=None,
                      sensor_height: float = 0.0) -> tuple:
        """One source's objects at the ego stamp in the ego frame: boxes (n, 7), scores (n,),
        labels (n,), velocities (n, 2) m/s and their standard deviations (n,) (NaN unknown: none
        sent, 0 from a detector that did not measure it, an object list's -1). The ego's
        (``agent`` None) from its entry; an ego map without its ROI fields gives none, as decoding
        all of it would cost as much as the fusion."""
        if agent is None:
            if isinstance(item, _EgoMap) and item.message is None:
                return np.zeros((0, 7)), np.zeros(0), np.zeros(0, np.int64), np.zeros((0, 2)), np.zeros(0)
            o = self._own_boxes(item, T_ego, ego_stamp)
            boxes, scores, labels, vel, std = o.boxes, o.scores, o.labels, o.velocities, o.velocity_std
        else:
            boxes, scores, labels, vel = self._collaborator_boxes(agent, item, pose, T_ego, stamp, ego_stamp,
                                                                  sensor_height)
            std = (self._frame_roi_boxes[(agent, stamp)] if isinstance(item, FeatureMessage) else item).velocity_std
        n = len(boxes)
        std = np.full(n, np.nan) if std is None else np.broadcast_to(np.asarray(std, np.float64), n)
        return (np.asarray(boxes, np.float64).reshape(-1, 7), np.asarray(scores, np.float64),
                np.asarray(labels, np.int64), np.asarray(vel, np.float64).reshape(-1, 2),
                np.where(std > 0, std, np.nan))

    def _with_lent(self, agent, stamp: int, item, pose, T_ego, lent: np.ndarray, velocity: np.ndarray,
                   velocity_std: np.ndarray, age_s: float):
        """A collaborator input whose objects ``lent`` (n,) bool take ``velocity`` (k, 2) m/s (ego
        axes) with ``velocity_std`` (k,); a feature message's ROI boxes of this frame move with them."""
        v_sender = rotate_vectors_2d(invert_pose(pose) @ T_ego, velocity).astype(np.float32)
        if isinstance(item, BoxList):
            v, std = item.velocities.copy(), np.asarray(item.velocity_std, np.float32).copy()
            v[lent], std[lent] = v_sender, velocity_std
            return replace(item, velocities=v, velocity_std=std)
        rb = self._frame_roi_boxes[(agent, stamp)]
        cell_velocity, cell_std = item.velocity.copy(), item.velocity_std.copy()
        for roi_id, v, sd in zip(item.roi[roi_peaks(item)][lent], v_sender, velocity_std):
            cell_velocity[item.roi == roi_id] = v
            cell_std[item.roi == roi_id] = sd
        boxes, vel, std = rb.boxes.copy(), rb.velocities.copy(), rb.velocity_std.copy()
        attributes = rb.attributes.copy()
        shift = max(age_s, 0.0)
        boxes[lent, :2] += velocity * shift
        vel[lent], std[lent] = velocity, velocity_std
        attributes[lent, ROI_ATTRIBUTES.index('displacement')] = np.hypot(*velocity.T) * shift
        self._frame_roi_boxes[(agent, stamp)] = replace(rb, boxes=boxes, velocities=vel, attributes=attributes,
                                                        velocity_std=std)
        return replace(item, velocity=cell_velocity, velocity_std=cell_std)

    # ------------------------------------------------------------------ reputation
    def _vetted(self, entry, chosen: dict, T_ego, ego_stamp: int) -> dict:
        """Judge every chosen collaborator's new input against the ego's view (fusion.reputation)
        and return ``chosen`` without the agents whose reputation is below the threshold
        (drops['low_reputation']); the others' reputations scale their trust in this frame."""
        self._scale = {}
        if not (self.reputation_on and chosen):
            return chosen
        start = time.perf_counter()
        judged = [agent for agent, (stamp, _, _) in chosen.items() if not self.reputation.seen(agent, stamp)]
        if judged:
            # every collaborator of the frame testifies about the others (fusion.reputation.Witness)
            cfg = self.reputation.cfg
            ego = self._own_boxes(entry, T_ego, ego_stamp)
            views = {agent: self._collaborator_boxes(agent, item, pose, T_ego, stamp, ego_stamp, entry.sensor_height)
                     for agent, (stamp, item, pose) in chosen.items()}
            witnesses = {agent: make_witness(agent, *views[agent][:3], getattr(item, 'free_range', None),
                                             invert_pose(pose) @ T_ego, (ego_stamp - stamp) / NS_PER_S,
                                             not self.reputation.excluded(agent), ego.boxes, ego.scores,
                                             ego.velocities, cfg)
                         for agent, (stamp, item, pose) in chosen.items()}
        for agent in judged:
            stamp = chosen[agent][0]
            evidence = consistency_evidence(*views[agent], (ego_stamp - stamp) / NS_PER_S, ego.boxes, ego.scores,
                                            ego.labels, entry.free_range, cfg,
                                            [w for other, w in witnesses.items() if other != agent])
            self.reputation.observe(agent, stamp, ego_stamp, evidence)
        kept = {}
        for agent, picked in chosen.items():
            if self.reputation.excluded(agent):
                self._drop('low_reputation', f'agent {agent} excluded: reputation {self.reputation.value(agent):.2f}')
            else:
                kept[agent] = picked
                self._scale[agent] = self.reputation.value(agent)
        self._stage_ms['reputation'] = (time.perf_counter() - start) * 1e3
        return kept

    def _add_stage_times(self, out: FusedDetections) -> None:
        """The lending's and the reputation's shares of the frame in ``out.timings_ms`` (also in
        'total')."""
        if self._stage_ms and out.timings_ms:
            out.timings_ms = {**self._stage_ms, **out.timings_ms,
                              'total': out.timings_ms.get('total', 0.0) + sum(self._stage_ms.values())}

    def _own_boxes(self, entry, T_ego, ego_stamp: int):
        """The ego's boxes of a frame (boxes, scores, labels): an ego map's from the head at its ROI
        peaks, which costs a fraction of decoding the whole map, decoded once though the lending and
        the reputation both read them."""
        if isinstance(entry, _EgoMap) and entry.message is not None:
            key = (self.ego_id, ego_stamp)
            if key not in self._frame_roi_boxes:
                self._frame_roi_boxes[key] = decode_roi_boxes(self.detector.head, entry.message, T_ego, T_ego,
                                                              ego_stamp, entry.sensor_height)
            return self._frame_roi_boxes[key]
        return self._ego_boxes(entry)

    def _collaborator_boxes(self, agent, item, pose, T_ego, stamp: int, ego_stamp: int,
                            sensor_height: float) -> tuple:
        """A collaborator input's boxes at the ego stamp in the ego frame -> (boxes (N, 7), scores
        (N,), labels (N,), velocities (N, 2) m/s): a feature message's ROI boxes, a box list's boxes."""
        if isinstance(item, FeatureMessage):
            rb = self._roi_boxes(agent, stamp, item, pose, T_ego, ego_stamp, sensor_height)
            return rb.boxes, rb.scores, rb.labels, rb.velocities
        boxes, vel = warp_boxes(item.boxes, item.velocities, pose, T_ego, stamp, ego_stamp,
                                motion_compensation=self.method.motion_compensation)
        return boxes, item.scores, item.labels, vel

    def _roi_boxes(self, agent, stamp: int, message: FeatureMessage, pose, T_ego, ego_stamp: int,
                   sensor_height: float):
        """``decode_roi_boxes`` of one collaborator message for the frame being fused, decoded once
        though the reputation and the merge both read them."""
        key = (agent, stamp)
        if key not in self._frame_roi_boxes:
            self._frame_roi_boxes[key] = decode_roi_boxes(self.detector.head, message, pose, T_ego, ego_stamp,
                                                          sensor_height)
        return self._frame_roi_boxes[key]

    def _scale_cells(self, warped: list, agents: list) -> None:
        """Scale each warped message's features by its sender's reputation (in place)."""
        for w, agent in zip(warped, agents):
            r = self._scale.get(agent, 1.0)
            if r < 1.0:
                w.features *= np.float32(r)

    def _scaled_parts(self, parts: list['_Part'], bits: dict) -> list['_Part']:
        """Each single collaborator's boxes with scores and trust scaled by its reputation."""
        if not self._scale:
            return parts
        agent_of = {bits[a]: a for a in self._scale}
        out = []
        for p in parts:
            r = self._scale.get(agent_of.get(p.sources), 1.0) if np.ndim(p.sources) == 0 else 1.0
            out.append(replace(p, scores=np.asarray(p.scores) * np.float32(r), trust=np.asarray(p.trust) * r)
                       if r < 1.0 else p)
        return out


@dataclass
class _EgoMap:
    """The ego's features of one frame whose boxes are not decoded yet (``add_ego_map``)."""
    features: np.ndarray      # (C, H, W) float32
    grid: BevGrid
    sensor_height: float      # m
    free_range: np.ndarray | None = None   # (B,) m, detection.free_range
    message: FeatureMessage | None = None  # the map's cells as received, ROI fields included


class _StageClock:
    """Wall time per stage of one fused frame (ms), for FusedDetections.timings_ms."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.stages: dict[str, float] = {}

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.stages[stage] = (now - self.last) * 1e3
        self.last = now

    def ms(self) -> dict[str, float]:
        return {**self.stages, 'total': (self.last - self.start) * 1e3}


@dataclass
class _Part:
    """One source's boxes for `_merge`; trust and sources are per box or one value for all."""
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    velocities: np.ndarray
    trust: np.ndarray | float
    sources: np.ndarray | int
    variance: np.ndarray | float = np.nan   # predicted corner variance (m^2) at the ego stamp; NaN unknown


def _cluster_nms(boxes, scores, labels, iou_threshold) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Class-wise greedy NMS over boxes (N, 7) -> (K,) kept indices and, for each, the indices of
    its cluster (the boxes of its class it suppressed, itself first) and their (m, m) BEV IoUs."""
    keep, clusters, overlaps = [], [], []
    for k in np.unique(labels):
        idx = np.flatnonzero(labels == k)
        order = idx[np.argsort(-scores[idx], kind='stable')]
        iou = bev_iou(boxes[order])
        free = np.ones(len(order), bool)
        for i in range(len(order)):
            if not free[i]:
                continue
            # i itself first, also at a threshold of 1 (the choice oracle's), which its own IoU
            # of 1 does not exceed
            over = iou[i] > iou_threshold
            over[i] = True
            members = np.flatnonzero(free & over)
            free[members] = False
            keep.append(order[i])
            clusters.append(order[members])
            overlaps.append(iou[np.ix_(members, members)])
    return np.asarray(keep, np.int64), clusters, overlaps


def _cluster_geometry(boxes, scores, variance, clusters, overlaps,
                      average_iou: float | None) -> tuple[np.ndarray, np.ndarray]:
    """One box per cluster (`_cluster_nms`) -> ((K, 7) boxes, (K,) index of the member each takes
    its velocity from).

    The reference member is the one with the smallest finite predicted variance (the leader when
    none reports one). With ``average_iou``, its geometry is the mean of the members overlapping
    it by more than that, weighted by score / variance (unknown variance: 1): several sources'
    independent errors average out, and a looser cluster member (a neighbour) stays out. Yaws
    are averaged modulo pi around the reference's, as the head's yaw can flip by pi."""
    ref = np.asarray([m[0] for m in clusters], np.int64)
    out = boxes[ref].copy()
    for c, members in enumerate(clusters):
        if len(members) == 1:
            continue
        v = variance[members]
        r = int(np.argmin(np.where(np.isfinite(v), v, np.inf))) if np.isfinite(v).any() else 0
        ref[c] = members[r]
        out[c] = boxes[ref[c]]
        if average_iou is None:
            continue
        near = members[overlaps[c][r] > average_iou]
        w = scores[near] / np.maximum(np.nan_to_num(variance[near], nan=1.0), 1e-4)
        if not w.sum() > 0:   # scores of 0 (a box trust that underflowed) or NaN: nothing to weigh
            continue
        w = w / w.sum()
        out[c, :6] = w @ boxes[near, :6]
        turn = (boxes[near, 6] - boxes[ref[c], 6] + np.pi / 2) % np.pi - np.pi / 2
        out[c, 6] = boxes[ref[c], 6] + w @ turn
    return out, ref
