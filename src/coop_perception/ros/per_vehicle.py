"""``coop-perception demo --per-vehicle``: what the ego vehicle's own computer does, at real time.

The demo's live run replays the scene at rate 0.1, because all five detectors share this machine.
A vehicle runs only its own detector and fusion; the collaborators' work reaches it as V2X
messages. This replays exactly that:

1. the demo's scene and bag (OUT/data, OUT/bag; generated or reused as by the demo);
2. the recording pass: the demo's live run records what the ego's trust_fusion receives through the
   v2x_channel, after its latency and loss (``live_run.delivered_topics``: the collaborators'
   feature messages on ``/agent{ego}/v2x/features`` and the odometry sent with each on
   ``/agent{ego}/v2x/odom``), as the serialised messages DDS delivered. OUT/record is used when
   OUT/demo.json says it was made with the same agents, ego, rate and parameter file; otherwise that
   live run runs now, into OUT/per_vehicle/recording (reused likewise, by its recording.json);
3. the per-vehicle bag OUT/per_vehicle/bag: the ego's own scans and odometry from the scene bag and
   the delivered messages, each at the bag time at which it was delivered (``build_per_vehicle_bag``);
4. replays it at rate 1 through the ego's lidar_detector and trust_fusion only (no v2x_channel, no
   other detector), recording their outputs into OUT/per_vehicle/record;
5. scores it as the demo does (``eval.live_eval``): fused AP, ego frames with fused output and
   end-to-end latency, ego scan stamp -> ``/coop/objects`` received. Written to OUT/per_vehicle.json.

Bag time of a delivered message. Every node and the recorder of the recording pass run on the
player's ``/clock``, which carries the scene bag's log time (``ros.bag_player``: the log time of the
message about to go out, and ticks at ``clock_hz`` of wall time in between). The recorder logs each
message at its ROS time of receipt, so its log time already is the bag time of delivery, and the
per-vehicle bag uses it as it is. The rate of that run sets how exact it is: the recorder's clock
advances in ticks of ``rate / clock_hz`` of bag time (1 ms at rate 0.1 and 100 Hz), and the wall
time by which it hears a message after the channel sent it shrinks by the rate too; a recording at
rate 1 would be ten times coarser, and its delivery times would include the delays of four
detectors competing for two cores. A recording logged outside the scene bag's time (another bag's,
or at wall-clock time), or with a feature message logged before its own capture stamp, cannot come
from such a clock and is refused.

Latency of the real-time run. At rate 1 the recorder's ROS time would lag by up to a ``/clock``
tick (10 ms), so this run's recorder logs wall-clock time, which ``live_eval.WallToBag`` maps to bag
time with the player's start time and rate: bag time = bag start + (wall time - start) x rate.
"""
from __future__ import annotations

import heapq
import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from coop_perception.data import ros_msgs
from coop_perception.data.bag import ODOMETRY, BagReader, BagWriter, agent_from_frame, lidar_topic, odom_topic
from coop_perception.data.labels import CLASSES
from coop_perception.errors import UserError
from coop_perception.eval import live_eval
from coop_perception.eval.ap import HEADLINE_CLASS
from coop_perception.ros import topics as T
from coop_perception.ros.bag_player import CLOCK_HZ
from coop_perception.ros.demo import (SCENE, DemoSettings, check_ego, json_default, mc_passes, pct, prepare_bag,
                                      prepare_scene, step, write_parameters)
from coop_perception.ros.launcher import ODOM_READERS, ego_node_specs
from coop_perception.ros.live_run import delivered_topics, ego_recorded_topics, run_live

STEPS = 5
RATE = 1.0                  # the real-time run: bag time = wall time
# Issue 12's acceptance for the real-time run: end-to-end median and p95 (ms), every ego frame fused.
TARGET_P50_MS = 100.0
TARGET_P95_MS = 150.0


@dataclass(frozen=True)
class BagMessage:
    t_ns: int               # log time = bag time
    topic: str
    msgtype: str
    qos: object             # the rosbags Qos offered with it
    raw: bytes              # CDR bytes, as recorded


def ego_sensor_messages(scene_bag, ego: int) -> list[BagMessage]:
    """The ego's own scans and odometry of ``scene_bag``, at their log times (their stamps)."""
    topics = [odom_topic(ego), lidar_topic(ego)]
    with BagReader(scene_bag) as bag:
        missing = [t for t in topics if t not in bag.topics]
        if missing:
            raise UserError(scene_bag, f'has no {", ".join(missing)}: agent {ego} cannot be the ego')
        return [BagMessage(t_ns, topic, msgtype, bag.topics[topic].qos[0], bytes(raw))
                for topic, msgtype, t_ns, raw in bag.raw_messages(topics)]


def delivered_messages(record, ego: int, span_ns: tuple[int, int]) -> list[BagMessage]:
    """The collaborator traffic the ego's fusion received in a live run recorded (with ROS-time log
    times) in ``record``, at its log time, which is the bag time of delivery (module doc).
    ``span_ns``: the first and last log time of the bag that run replayed. A recorder on its
    ``/clock`` logs nothing outside it (ROS time stops with the bag), nor a feature message before
    its capture stamp; a recording that does is refused."""
    topics = list(delivered_topics(ego))
    features = T.agent_topic(ego, T.V2X_FEATURES)
    out = []
    with BagReader(record) as bag:
        if features not in bag.topics:
            raise UserError(record, f'holds no {features}: not a recording of what the ego {ego} received through '
                                    'the V2X channel')
        for topic, msgtype, t_ns, raw in bag.raw_messages([t for t in topics if t in bag.topics]):
            if not span_ns[0] <= t_ns <= span_ns[1]:
                raise UserError(record, f'{topic} holds a message logged {(t_ns - span_ns[0]) * 1e-9:.3f} s after the '
                                        "scene bag's start, outside it: a recording of another bag, or not at ROS "
                                        'time of receipt')
            if topic == features:
                stamp = ros_msgs.stamp_ns(bag.typestore.deserialize_cdr(raw, msgtype).header.stamp)
                if t_ns < stamp:
                    raise UserError(record, f'{topic} holds a message logged {(stamp - t_ns) * 1e-6:.1f} ms before '
                                            'its stamp: not logged at ROS time of receipt')
            out.append(BagMessage(t_ns, topic, msgtype, bag.topics[topic].qos[0], bytes(raw)))
    return out


def _bag_order(m: BagMessage) -> tuple[int, bool]:
    return m.t_ns, m.msgtype != ODOMETRY


def merge_by_bag_time(*streams: list[BagMessage]) -> list[BagMessage]:
    """The messages of ``streams`` in bag-time order. At equal times odometry goes first (as in the
    scene bag and as the channel sends it: a pose before the data that needs it); otherwise each
    stream keeps its order."""
    return list(heapq.merge(*(sorted(s, key=_bag_order) for s in streams), key=_bag_order))


def build_per_vehicle_bag(scene_bag, record, out, ego: int, storage: str = 'mcap') -> dict:
    """Write the per-vehicle bag ``out`` (replaced if there): the ego's scans and odometry from
    ``scene_bag`` merged with what ``record`` says the channel delivered to the ego. Returns a
    summary: messages per topic, delivered feature messages per collaborator and their age at
    delivery (bag time of delivery - capture stamp, ms)."""
    own = ego_sensor_messages(scene_bag, ego)
    with BagReader(scene_bag) as scene:
        span = (scene.start_ns, scene.start_ns + scene.duration_ns)
    delivered = delivered_messages(record, ego, span)
    merged = merge_by_bag_time(own, delivered)
    out = Path(out)
    shutil.rmtree(out, ignore_errors=True)
    counts: dict[str, int] = {}
    with BagWriter(out, storage) as writer:
        for m in merged:
            writer.write_raw(m.topic, m.msgtype, m.qos, m.t_ns, m.raw)
            counts[m.topic] = counts.get(m.topic, 0) + 1
    features = T.agent_topic(ego, T.V2X_FEATURES)
    senders: dict[str, int] = {}
    ages = []
    with BagReader(out) as bag:
        for _, t_ns, msg in bag.messages([features]) if features in bag.topics else ():
            k = str(agent_from_frame(msg.header.frame_id))
            senders[k] = senders.get(k, 0) + 1
            ages.append((t_ns - ros_msgs.stamp_ns(msg.header.stamp)) * 1e-6)
    age = ({'min': round(min(ages), 1), 'p50': round(float(np.median(ages)), 1), 'max': round(max(ages), 1)}
           if ages else None)
    return {'bag': str(out), 'messages': counts, 'delivered_features_by_agent': dict(sorted(senders.items())),
            'age_at_delivery_ms': age}


# --------------------------------------------------------------------------- the recording pass
def _description(meta: dict) -> dict:
    """What decides whether a live run's recording can be reused, from demo.json or recording.json."""
    st = meta.get('settings', {})
    return {'agents': meta.get('agents'), 'ego': meta.get('ego'), 'rate': st.get('rate'),
            'parameters': st.get('parameters')}


def _reusable(meta_path: Path, record: Path, wanted: dict, scene_bag: Path) -> bool:
    if not (meta_path.is_file() and (record / 'metadata.yaml').exists()):
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict) or _description(meta) != wanted:
        return False
    with BagReader(scene_bag) as scene:
        span = (scene.start_ns, scene.start_ns + scene.duration_ns)
    try:   # e.g. a recording of the scene bag before it was generated anew
        delivered_messages(record, wanted['ego'], span)
    except UserError:
        return False
    return True


def find_recording(s: DemoSettings, params: dict, scene_bag: Path) -> Path | None:
    """A recording of the demo's live run with settings ``s`` and parameter file ``params`` that
    holds the delivered collaborator traffic: OUT/record (the demo's) or
    OUT/per_vehicle/recording/record (a recording pass of its own); None if neither fits."""
    wanted = _description({'agents': s.live.agents, 'ego': s.live.ego,
                           'settings': {'rate': s.live.rate, 'parameters': json.loads(json.dumps(params))}})
    own = s.out / 'per_vehicle' / 'recording'
    for meta, record in ((s.out / 'demo.json', s.out / 'record'), (own / 'recording.json', own / 'record')):
        if _reusable(meta, record, wanted, scene_bag):
            return record
    return None


def _recording_pass(s: DemoSettings, bag: Path, env: dict | None, progress: bool) -> tuple[Path, bool]:
    """(the recording to take the delivered traffic from, whether it was reused)."""
    folder = s.out / 'per_vehicle' / 'recording'
    folder.mkdir(parents=True, exist_ok=True)
    params = write_parameters(folder / 'params.yaml', s)
    found = find_recording(s, params, bag)
    if found is not None:
        step(3, f'reusing the recording {found} of the live run at rate {s.live.rate:g}', STEPS)
        return found, True
    step(3, f'recording pass: the demo\'s live run at rate {s.live.rate:g} through {s.live.agents} lidar_detectors + '
             f'v2x_channel ({s.channel_model}, {s.latency_ms:g} ms mean) + trust_fusion ({s.method}), recording what '
             f'the ego\'s fusion receives, into {folder}', STEPS)
    (folder / 'recording.json').unlink(missing_ok=True)
    run = run_live(bag, folder / 'params.yaml', folder, s.live, env=env, progress=progress)
    (folder / 'recording.json').write_text(json.dumps(
        {'agents': s.live.agents, 'ego': s.live.ego,
         'settings': {'rate': s.live.rate, 'collaborator_nice': s.live.collaborator_nice, 'parameters': params},
         'run': run}, indent=2, default=json_default))
    return Path(run['record']), False


# --------------------------------------------------------------------------- the real-time run
def _score(record, ds, ego: int, max_range_m: float, log_to_bag=None) -> tuple[list, dict]:
    frames, stray = live_eval.replay_frames(record, ds, SCENE, ego, T.FUSED_OBJECTS,
                                            T.agent_topic(ego, T.LOCAL_OBJECTS), log_to_bag)
    scores = {w: live_eval.score(frames, w, CLASSES, max_range_m) for w in ('ego_only', 'fused')}
    return frames, {
        **scores,
        'frames_with_output': scores['fused']['frames_with_output'],
        'latency_ms': live_eval.latency_summary(frames, 'fused'),
        'ego_only_latency_ms': live_eval.latency_summary(frames, 'ego_only'), 'stray_outputs': stray}


def run_per_vehicle(s: DemoSettings, *, env: dict | None = None, progress: bool = True) -> dict:
    """Every step of the module doc, into ``s.out``; returns what OUT/per_vehicle.json holds."""
    t0 = time.monotonic()
    ego = s.live.ego
    check_ego(s)
    s.out.mkdir(parents=True, exist_ok=True)
    ds = prepare_scene(s, progress, STEPS)
    bag = prepare_bag(s, ds, progress, STEPS)
    wall = {'data': time.monotonic() - t0}

    t1 = time.monotonic()
    record, reused = _recording_pass(s, bag, env, progress)
    wall['recording'] = time.monotonic() - t1

    folder = s.out / 'per_vehicle'
    step(4, f'per-vehicle bag {folder / "bag"}: agent {ego}\'s scans and odometry + the collaborator traffic '
             f'delivered to it in {record}, at the bag time of delivery', STEPS)
    built = build_per_vehicle_bag(bag, record, folder / 'bag', ego)

    step(5, f'real-time replay (rate {RATE:g}) through agent {ego}\'s lidar_detector + trust_fusion ({s.method}) '
             'only; models load first', STEPS)
    params = write_parameters(folder / 'params.yaml', s)
    wait = [lidar_topic(ego), f'{odom_topic(ego)}:{ODOM_READERS}',
            *(t for t in delivered_topics(ego) if t in built['messages'])]
    run = run_live(folder / 'bag', folder / 'params.yaml', folder, replace(s.live, rate=RATE, collaborator_nice=0),
                   env=env, progress=progress, nodes=ego_node_specs(s.live.agents, ego),
                   topics=ego_recorded_topics(ego), wait_topics=wait, record_wall_time=True)
    wall['real_time'] = run['wall_s']['total']
    if not run['player'] or run['player'].get('start_wall_time') is None:
        raise UserError(folder / 'logs', 'the bag player wrote no start time, so latencies cannot be measured; '
                                         'see its log')
    with BagReader(folder / 'bag') as played:
        to_bag = live_eval.WallToBag(round(run['player']['start_wall_time'] * 1e9), played.start_ns, RATE)
    frames, live = _score(run['record'], ds, ego, s.max_range_m, to_bag)
    _, recorded = _score(record, ds, ego, s.max_range_m)
    detector = live_eval.last_json(run['record'], T.agent_topic(ego, T.DETECTOR_STATUS)) or {}
    status = live_eval.last_json(run['record'], T.FUSION_STATUS) or {}

    result = {
        'scene': ds.scenes[SCENE].name, 'agents': s.live.agents, 'ego': ego, 'ego_frames': len(frames),
        'settings': {'rate': RATE, 'recording_rate': s.live.rate, 'collaborator_nice': s.live.collaborator_nice,
                     'mc_passes': mc_passes(s.detector_config), 'method': s.method, 'channel': s.channel_model,
                     'mean_latency_ms': s.latency_ms, 'channel_seed': s.channel_seed, 'max_range_m': s.max_range_m,
                     'headline_class': HEADLINE_CLASS, 'parameters': params},
        'recording': {'record': str(record), 'reused': reused,
                      'delivery_time_resolution_ms': s.live.rate * 1e3 / CLOCK_HZ},
        'per_vehicle_bag': built,
        'live': {**live, 'fused_fraction': live['frames_with_output'] / max(len(frames), 1),
                 'targets': {'p50_ms': TARGET_P50_MS, 'p95_ms': TARGET_P95_MS},
                 'ego_scans_detected': detector.get('scans'),
                 'detect_ms': (detector.get('detect_ms') or {}).get('p50'),
                 'fusion_processing_wall_ms': status.get('processing_ms'),
                 'collaborator_inputs': {k: a.get('inputs') for k, a in (status.get('agents') or {}).items()},
                 'player_lateness_ms': (run['player'] or {}).get('lateness_ms'),
                 'frames': [{'frame': fr.index, 'stamp_ns': fr.stamp_ns, 'gt': len(fr.gt_boxes),
                             'fused': None if fr.fused is None else len(fr.fused),
                             'fused_latency_ms': fr.fused_latency_ms, 'ego_only_latency_ms': fr.ego_only_latency_ms}
                            for fr in frames],
                 'fusion_status': status, 'run': run},
        'recording_pass': recorded,
        'outputs': {'json': str(s.out / 'per_vehicle.json'), 'bag': str(folder / 'bag'), 'record': run['record'],
                    'logs': str(folder / 'logs')},
    }
    wall['total'] = time.monotonic() - t0
    result['wall_s'] = {k: round(v, 1) for k, v in wall.items()}
    (s.out / 'per_vehicle.json').write_text(json.dumps(result, indent=2, default=json_default))
    return result


def format_report(r: dict) -> str:
    """The printed summary of ``run_per_vehicle``'s result."""
    st, live, rec, built = r['settings'], r['live'], r['recording_pass'], r['per_vehicle_bag']
    senders = ', '.join(f'agent {k} {n}' for k, n in built['delivered_features_by_agent'].items()) or 'none'
    age = built['age_at_delivery_ms']
    lines = [
        f"{r['scene']}: {r['agents']} agents (agent 0 = RSU), ego = agent {r['ego']}, {r['ego_frames']} ego frames",
        f"per-vehicle run at rate {st['rate']:g} (bag time = wall time): only agent {r['ego']}'s lidar_detector and "
        f"trust_fusion ({st['method']}) run, MC-dropout passes {st['mc_passes']};",
        f"  the collaborators' feature messages come from the bag, as the V2X channel ({st['channel']} "
        f"{st['mean_latency_ms']:g} ms mean, seed {st['channel_seed']}) delivered them in the live run at rate "
        f"{st['recording_rate']:g} ({'reused' if r['recording']['reused'] else 'run now'}: {r['recording']['record']})",
        f"  delivered feature messages: {senders}"
        + (f"; age at delivery {age['min']:.0f}-{age['max']:.0f} ms (median {age['p50']:.0f})" if age else ''),
        '',
        f"{st['headline_class']} AP in %, BEV rotated IoU, within {st['max_range_m']:g} m of the ego "
        f"(same ground truth and AP as `eval fusion`)",
        f"{'':<48}{'AP@0.5':>8}{'AP@0.7':>8}",
        f"{'rate ' + format(st['rate'], 'g') + ' ego only (/agent' + str(r['ego']) + '/coop/objects)':<48}"
        f"{pct(live['ego_only']['ap50']):>8}{pct(live['ego_only']['ap70']):>8}",
        f"{'rate ' + format(st['rate'], 'g') + ' fused (/coop/objects)':<48}"
        f"{pct(live['fused']['ap50']):>8}{pct(live['fused']['ap70']):>8}",
        f"{'recording pass, rate ' + format(st['recording_rate'], 'g') + ', fused':<48}"
        f"{pct(rec['fused']['ap50']):>8}{pct(rec['fused']['ap70']):>8}",
        '',
        f"ego frames with fused output: {live['frames_with_output']}/{r['ego_frames']} "
        f"({100 * live['fused_fraction']:.0f} %)",
    ]
    lat, local = live['latency_ms'], live['ego_only_latency_ms']
    if lat:
        met = lat['p50'] <= TARGET_P50_MS and lat['p95'] <= TARGET_P95_MS
        lines.append(f"end-to-end latency, ego scan stamp -> /coop/objects received (wall clock mapped to bag time): "
                     f"median {lat['p50']:.1f} ms, p95 {lat['p95']:.1f} ms over {lat['n']} frames "
                     f"(target median <= {TARGET_P50_MS:g}, p95 <= {TARGET_P95_MS:g}: {'met' if met else 'missed'})")
        extra = []
        if local:
            extra.append(f"the ego detector's own output alone: median {local['p50']:.1f} ms")
        proc = live['fusion_processing_wall_ms']
        if proc:
            extra.append(f"trust_fusion's processing: median {proc['p50']:.1f} ms")
        late = live['player_lateness_ms']
        if late:
            extra.append(f"player lateness p95 {late['p95']:.1f} ms")
        if extra:
            lines.append('  ' + '; '.join(extra))
    else:
        lines.append('end-to-end latency: no fused frame, none measured')
    scans = live['ego_scans_detected']
    lines.append(f"ego scans detected: {scans if scans is not None else '?'} of {live['run']['ego_scans_in_bag']}"
                 + (f" (median {live['detect_ms']:.0f} ms a scan)" if live['detect_ms'] is not None else ''))
    codes = {k: v for k, v in live['run']['exit_codes'].items() if v != 0}
    lines.append('every node stopped cleanly' if not codes else f'nodes that did not stop cleanly: {codes}')
    ws, run = r['wall_s'], live['run']['wall_s']
    lines.append(f"wall time {ws['total']:.0f} s: data {ws['data']:.0f}, recording {ws['recording']:.0f}, "
                 f"real-time run {ws['real_time']:.0f} (node start-up {run['startup']:.0f}, replay and drain "
                 f"{run['replay_and_drain']:.0f})")
    o = r['outputs']
    lines.append(f"wrote {o['json']}, per-vehicle bag {o['bag']}, recorded bag {o['record']} (MCAP), logs {o['logs']}")
    return '\n'.join(lines)
