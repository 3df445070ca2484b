"""Cooperative detection under communication delay: AP per method x mean latency, and bytes sent
per collaborator-frame, all through `CooperativeDetector` (the object the ROS node runs).

Every vehicle agent takes the ego role in turn; every other agent (RSU included) is a
collaborator whose LiDAR is out of phase with the ego's and whose messages arrive after a latency
drawn from a seeded channel model with the given mean. Ground truth: objects any agent has LiDAR
returns on, at the ego's capture time, in the ego frame, within `max_range` of the ego.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace

from tqdm import tqdm

from ..data.channel import channel_for_mean_latency
from ..data.ground_truth import cooperative_targets
from ..data.synth import RSU_AGENT
from ..fusion.cache import FeatureCache
from ..fusion.codec import FeatureMessage, encode
from ..fusion.methods import METHODS
from ..fusion.payloads import BoxList, RawPoints
from ..fusion.pipeline import CooperativeConfig, CooperativeDetector, Sender, collaborator_message
from ..fusion.sharing import DEFAULT_SHARING, ROI_SCORE_THRESHOLD
from .ap import HEADLINE_CLASS, APAccumulator
from .bootstrap import ap_difference


def method_policy(method: str, roi_policy: dict | None) -> dict:
    """The roi policy ``method``'s collaborators send with: ``roi_policy``, in the method's own
    wire layout where it needs one (fusion.methods), with that layout's budget when it differs."""
    policy = dict(roi_policy or {})
    need = METHODS[method].sharing
    if need is not None and policy.get('format', DEFAULT_SHARING) != need:
        policy.pop('max_bytes', None)
        policy['format'] = need
    return policy


def _payload(kind: type, view, agent, points_fn, roi_policy):
    """(input for the pipeline, bytes on the wire) of one collaborator scan; ``kind`` is a
    method's payload type (fusion.methods)."""
    det = view.detections
    if kind is FeatureMessage:
        msg = collaborator_message(det, agent, view.stamp_ns, roi_policy)
        return msg, len(encode(msg)[1])
    if kind is BoxList:
        # late fusion shares the boxes it is as confident about as intermediate fusion's ROIs
        item = BoxList.from_detections(det, (roi_policy or {}).get('score_threshold', ROI_SCORE_THRESHOLD))
    else:
        item = RawPoints(points_fn())
    return item, item.wire_bytes


def _scene_payloads(cache: FeatureCache, samples, kind: type, roi_policy, sender_truth=None) -> dict:
    """Every agent scan of one scene as it goes on the air: (frame, agent) -> (capture stamp ns,
    T_world_sensor, pipeline input, bytes). Each agent's sender tracks velocities over all its
    scans in capture order, whichever agent is the ego; computed once per scene and payload kind,
    then shared by every method, delay and ego that sends it. ``sender_truth(det, sample, agent)``
    (a diagnosis oracle, eval.delay_diagnosis) may replace what the sender knows by ground truth."""
    scene = samples[0].scene_name
    senders: dict = defaultdict(Sender)
    out = {}
    for f, smp in enumerate(samples):
        for k, agent in sorted(smp.agents.items()):
            view = cache.load(scene, f, k)
            det = senders[k].prepare(view.detections, view.T_world_sensor, view.stamp_ns)
            if sender_truth is not None:
                det = sender_truth(det, smp, k)
            item, nbytes = _payload(kind, replace(view, detections=det), k,
                                    lambda a=agent: a.load_points()[:, :4], roi_policy)
            out[(f, k)] = (view.stamp_ns, view.T_world_sensor, item, nbytes)
    return out


def scene_samples(dataset, scene: int, egos=None) -> tuple[list, list[int]]:
    """Every sample of ``scene`` and the agents that take the ego role in it: each vehicle (the
    road-side unit never), or those of them in ``egos``."""
    samples = [dataset.sample(scene, f) for f in range(dataset.num_frames(scene))]
    agents = sorted({k for smp in samples for k in smp.agents})
    return samples, [a for a in agents if a != RSU_AGENT and (egos is None or a in egos)]


@dataclass
class _Tally:
    """What one (method, delay) row accumulates over scenes and egos."""
    acc: APAccumulator
    sent_bytes: int = 0
    sent: int = 0
    drops: Counter = field(default_factory=Counter)


def evaluate_fusion(dataset, detector, cache: FeatureCache, fusion_model, methods, delays_ms, *,
                    channel_model: str = 'uniform', seed: int = 0, max_range: float = 50.0,
                    egos=None, roi_policy: dict | None = None, gate: dict | None = None,
                    bootstrap: int = 0, progress: bool = True) -> dict:
    """AP of every method at every mean delay -> {'results': one row per (method, delay), ...}.
    With ``bootstrap`` resamples, also 'differences': trust's car AP@0.7 minus late's and
    trust_flat's (where evaluated) per delay, with 90 % paired-bootstrap intervals over the
    scenes (eval.bootstrap): the egos of one scene see the same objects and events, so the scene
    is the unit that varies independently."""
    classes = detector.cfg.classes
    # a method without delay (early fusion, the upper bound) runs once; its row repeats for every delay
    runs = [(m, float(d)) for m in methods for d in (delays_ms if METHODS[m].delayed else delays_ms[:1])]
    tallies = {run: _Tally(APAccumulator(classes, max_range=max_range)) for run in runs}
    bar = tqdm(total=len(runs) * len(dataset.scenes), desc='eval fusion', unit='scene', disable=not progress)
    for s in range(len(dataset.scenes)):
        samples, scene_egos = scene_samples(dataset, s, egos)
        payloads: dict = {}
        for name, delay in runs:
            kind, policy = METHODS[name].payload, method_policy(name, roi_policy)
            key = (kind, policy.get('format'))
            if kind is not None and key not in payloads:
                payloads[key] = _scene_payloads(cache, samples, kind, policy)
            for ego in scene_egos:
                _run_ego(tallies[(name, delay)], detector, cache, samples, ego, delay, payloads.get(key, {}),
                         fusion_model, CooperativeConfig(method=name, roi_policy=policy, gate=gate),
                         channel_model, seed)
            bar.update(1)
    bar.close()
    results = []
    for method in methods:
        for delay in delays_ms:
            t = tallies[(method, float(delay if METHODS[method].delayed else delays_ms[0]))]
            summary = t.acc.summary()
            head = summary['ap'][HEADLINE_CLASS]
            results.append({'method': method, 'delay_ms': float(delay), 'ap50': head['0.5'], 'ap70': head['0.7'],
                            'ap30': head['0.3'], 'mean_ap': summary['mean'], 'ap': summary['ap'],
                            'bytes_per_agent_frame': t.sent_bytes / t.sent if t.sent else 0.0,
                            'frames': summary['frames'], 'drops': dict(t.drops)})
    out = {'results': results, 'headline_class': HEADLINE_CLASS, 'max_range_m': max_range,
           'channel': channel_model, 'seed': seed}
    if bootstrap:
        out['differences'] = _differences(tallies, methods, delays_ms, bootstrap, seed)
    return out


def evaluate_sharing(dataset, detector, cache: FeatureCache, fusion_model, methods, delays_ms,
                     policies: list[dict], **kwargs) -> dict:
    """``evaluate_fusion`` once per sharing policy (roi policy dicts: ``format``, ``max_bytes``,
    fusion.sharing): rows of the methods that send feature messages carry their policy's
    ``sharing`` layout and ``budget_bytes``; the other methods, which no policy changes, run with
    the first only. Bootstrap differences are per policy, between the methods it ran."""
    results, differences, out = [], [], {}
    for i, policy in enumerate(policies):
        run = [m for m in methods if i == 0 or METHODS[m].payload is FeatureMessage]
        out = evaluate_fusion(dataset, detector, cache, fusion_model, run, delays_ms, roi_policy=policy, **kwargs)
        for row in out['results']:
            results.append({**row, **(_policy_tag(method_policy(row['method'], policy))
                                      if METHODS[row['method']].payload is FeatureMessage else {})})
        differences += [{**d, **_policy_tag(policy)} for d in out.get('differences', [])]
    out['results'] = results
    if differences:
        out['differences'] = differences
    return out


def _policy_tag(policy: dict) -> dict:
    return {'sharing': policy.get('format', DEFAULT_SHARING), 'budget_bytes': policy.get('max_bytes')}


# (a, b): the comparisons the latency issue's targets are stated in
COMPARISONS = (('trust', 'late'), ('trust', 'trust_flat'))


def _differences(tallies: dict, methods, delays_ms, resamples: int, seed: int) -> list[dict]:
    rows = []
    for a, b in COMPARISONS:
        if a not in methods or b not in methods:
            continue
        for delay in delays_ms:
            diff = ap_difference(tallies[(a, float(delay))].acc, tallies[(b, float(delay))].acc, HEADLINE_CLASS, 0.7,
                                 resamples=resamples, seed=seed)
            rows.append({'a': a, 'b': b, 'delay_ms': float(delay), 'iou': 0.7, **diff})
    return rows


def _run_ego(tally: _Tally, detector, cache, samples, ego: int, mean_ms: float, payloads: dict,
             fusion_model, cfg: CooperativeConfig, channel_model: str, seed: int, oracle=None,
             absent=(), observe=None) -> None:
    """One ego through one scene: collaborators' payloads go through a fresh seeded channel (none
    for a method without delay), the pipeline fuses each ego frame with what has arrived by its
    capture time. ``oracle`` (eval.delay_diagnosis) may swap each used input and the output for
    ground truth. Agents in ``absent`` send nothing; ``observe(coop, frame, ego_stamp_ns)`` is
    called after every fused frame (eval.attack_eval reads the reputations)."""
    scene = samples[0].scene_name
    method = METHODS[cfg.method]
    channel = channel_for_mean_latency(mean_ms if method.delayed else 0.0, channel_model, seed=seed)
    coop = CooperativeDetector(detector, ego, cfg, fusion_model if method.needs_fusion_model else None)
    # the ego tracks its own detections as every sender does (its detector node does, live)
    ego_sender = Sender()
    pending = []  # (arrival_ns, agent, stamp_ns, pose, item, frame)
    newest = {}   # for the oracle: agent -> its newest arrived entry (the input the pipeline uses)
    for f, smp in enumerate(samples):
        if ego not in smp.agents:
            continue
        if method.payload is not None:
            for k in smp.agents:
                if k == ego or k in absent:
                    continue
                stamp, pose, item, nbytes = payloads[(f, k)]
                tally.sent_bytes += nbytes
                tally.sent += 1
                delivery = channel.send(k, nbytes)
                if delivery.delivered:
                    pending.append((delivery.arrival_ns(stamp), k, stamp, pose, item, f))
        ego_view = cache.load(scene, f, ego)
        t_e = ego_view.stamp_ns
        coop.add_pose(ego, t_e, ego_view.T_world_sensor)
        coop.add_ego_detections(t_e, ego_sender.prepare(ego_view.detections, ego_view.T_world_sensor, t_e),
                                payloads[(f, ego)][2].points if method.payload is RawPoints else None)
        arrived = [p for p in pending if p[0] <= t_e]
        pending = [p for p in pending if p[0] > t_e]
        for _, k, stamp, pose, item, _ in arrived:
            coop.add_pose(k, stamp, pose)
            coop.add_input(k, stamp, item)
        if oracle is not None:
            for p in arrived:
                if p[1] not in newest or p[2] > newest[p[1]][2]:
                    newest[p[1]] = p
            for _, k, stamp, pose, item, f_sent in newest.values():
                coop.add_input(k, stamp, oracle.predict(k, item, pose, samples[f_sent], smp, ego_view), replace=True)
        out = coop.detect(t_e)
        if observe is not None:
            observe(coop, f, t_e)
        boxes, labels, _ = cooperative_targets(smp, ego)
        if out is not None and oracle is not None:
            out = oracle.choose(out, boxes, labels)
        if out is not None:
            tally.acc.add_frame(out.boxes, out.scores, out.labels, boxes, labels, group=scene)
    tally.drops.update(coop.drops)


def format_results(result: dict) -> str:
    rows = result['results']
    w = max([len('method'), *(len(r['method']) for r in rows)]) + 1
    swept = any('sharing' in r for r in rows)
    lines = [f"{'method':<{w}}{'delay ms':>9}{'AP@0.5':>8}{'AP@0.7':>8}{'bytes/agent-frame':>19}"
             + (f"{'sharing':>9}{'budget':>8}" if swept else ''), '-' * (w + (61 if swept else 44))]
    for r in rows:
        ap50 = f"{100 * r['ap50']:.1f}" if r['ap50'] is not None else 'n/a'
        ap70 = f"{100 * r['ap70']:.1f}" if r['ap70'] is not None else 'n/a'
        budget = '' if 'sharing' not in r else ('none' if r['budget_bytes'] is None else str(r['budget_bytes']))
        lines.append(f"{r['method']:<{w}}{r['delay_ms']:>9.0f}{ap50:>8}{ap70:>8}{r['bytes_per_agent_frame']:>19.0f}"
                     + (f"{r.get('sharing', ''):>9}{budget:>8}" if swept else ''))
    lines.append(f"({result['headline_class']} AP in %, BEV rotated IoU, within {result['max_range_m']:g} m of the "
                 f"ego; {result['channel']} latency channel, seed {result['seed']})")
    for d in result.get('differences', []):
        interval = (f"{100 * d['level']:.0f} % interval {100 * d['low']:+.1f} to {100 * d['high']:+.1f}"
                    if d['low'] is not None else 'no interval')
        value = f"{100 * d['difference']:+.1f}" if d['difference'] is not None else 'n/a'
        policy = f" ({d['sharing']}, budget {d['budget_bytes']})" if 'sharing' in d else ''
        lines.append(f"{d['a']} - {d['b']} at {d['delay_ms']:.0f} ms{policy}: {value} "
                     f"{result['headline_class']} AP@0.7 ({interval}; paired bootstrap, {d['resamples']} "
                     f"resamples of {d['groups']} scenes)")
    return '\n'.join(lines)
