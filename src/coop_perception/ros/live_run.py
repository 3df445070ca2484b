"""One live replay of a scene bag through the whole runtime, recorded.

Starts what ``coop-perception launch --bag BAG`` starts (a lidar_detector per agent, the ego's
v2x_channel and trust_fusion, the bag player) as separate processes, the player once every node
is ready; records the outputs with a :class:`~coop_perception.ros.recorder.BagRecorder`, and
stops everything once the replay is over and the pipeline has drained. It also records what the
ego's trust_fusion receives from the collaborators through the channel (``delivered_topics``), from
which ``ros.per_vehicle`` replays the ego's pipeline alone. ``run_live`` also runs such a replay:
any subset of the nodes, any recorded topics.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm import tqdm

from coop_perception.data.bag import MARKER_ARRAY, ODOMETRY, POINTCLOUD2, STRING, BagReader, lidar_topic
from coop_perception.errors import UserError
from coop_perception.ros import topics as T
from coop_perception.ros.launcher import PLAYER_WAIT_S, Launch, NodeSpec, node_specs, player_spec


@dataclass(frozen=True)
class LiveRunSettings:
    agents: int = 5
    ego: int = 1
    rate: float = 0.1                   # bag time per wall time
    collaborator_nice: int = 10         # niceness added to every detector but the ego's; 0: none
    # After the player ends: stop once no fused output came for this long (wall s; longer than
    # the status period, so the last /coop/status counts every frame), at most drain_max_s.
    drain_idle_s: float = 3.0
    drain_max_s: float = 60.0
    start_timeout_s: float = PLAYER_WAIT_S


def delivered_topics(ego: int) -> dict[str, str]:
    """What the ego's trust_fusion receives from the collaborators, as the v2x_channel delivers it
    (after its latency and loss): their feature messages and the odometry sent with each."""
    return {T.agent_topic(ego, T.V2X_ODOM): ODOMETRY, T.agent_topic(ego, T.V2X_FEATURES): POINTCLOUD2}


def ego_recorded_topics(ego: int) -> dict[str, str]:
    """The ego pipeline's outputs: fused output, the ego's own detections and both nodes' status."""
    return {T.FUSED_OBJECTS: POINTCLOUD2, T.FUSED_MARKERS: MARKER_ARRAY, T.FUSION_STATUS: STRING,
            T.agent_topic(ego, T.LOCAL_OBJECTS): POINTCLOUD2, T.agent_topic(ego, T.DETECTOR_STATUS): STRING}


def recorded_topics(agents: int, ego: int) -> dict[str, str]:
    """What a live run records: the ego pipeline's outputs, every status topic and the delivered
    collaborator traffic."""
    recorded = {**ego_recorded_topics(ego), T.agent_topic(ego, T.V2X_STATUS): STRING, **delivered_topics(ego)}
    recorded.update({T.agent_topic(k, T.DETECTOR_STATUS): STRING for k in range(agents)})
    return recorded


def _renice(pid: int, increment: int) -> None:
    """Lower the priority of every thread of ``pid`` (Linux niceness is per thread; threads
    started later inherit it from the main thread)."""
    tasks = Path(f'/proc/{pid}/task')
    for tid in ([int(t.name) for t in tasks.iterdir()] if tasks.exists() else [pid]):
        try:
            os.setpriority(os.PRIO_PROCESS, tid, min(os.getpriority(os.PRIO_PROCESS, tid) + increment, 19))
        except (ProcessLookupError, PermissionError):
            pass


def _ego_scans_and_duration(bag: Path, ego: int) -> tuple[int, float]:
    """(scans of the ego in ``bag``, bag duration in s)."""
    with BagReader(bag) as reader:
        if lidar_topic(ego) not in reader.topics:
            raise UserError(bag, f'has no {lidar_topic(ego)}: agent {ego} cannot be the ego')
        return reader.topics[lidar_topic(ego)].count, reader.duration_ns * 1e-9


def _check_alive(launch: Launch, log_dir: Path) -> dict:
    """label -> exit code (None: running) of ``launch``'s processes; UserError if one failed."""
    codes = launch.poll()
    dead = {label: code for label, code in codes.items() if code not in (None, 0)}
    if dead:
        raise UserError(log_dir, f'node(s) exited early with codes {dead}; see their logs')
    return codes


def run_live(bag, params: Path, out: Path, settings: LiveRunSettings, *, env: dict | None = None,
             progress: bool = True, nodes: list[NodeSpec] | None = None, topics: dict[str, str] | None = None,
             wait_topics: list[str] | None = None, record_wall_time: bool = False) -> dict:
    """Replay ``bag`` through ``nodes`` (default: every node of the launch) with parameter file
    ``params``; record ``topics`` (default ``recorded_topics``) into ``out/record`` (replaced if
    there) with node logs in ``out/logs``. The player waits for the subscribers of ``wait_topics``
    (``player_spec``'s default: every agent's lidar and odometry). The recording is logged at the
    recorder's ROS time of receipt, or at its wall-clock time (``record_wall_time``; the player's
    ``start_wall_time`` maps it to bag time). Returns a summary: the recorded bag, its log clock,
    messages per recorded topic, node exit codes, the player's statistics and wall times (s) of
    start-up (until every node reported its status) and of replay and drain.

    The player starts once every node has published its status, i.e. has loaded its models and
    spins, so the recorder's clock and every status topic are live from the first frame."""
    # imported here: the recorder is a ROS node, and the demo command registers without rclpy
    from coop_perception.ros.recorder import BagRecorder

    bag, out = Path(bag), Path(out)
    logs = out / 'logs'
    ego_scans, duration_s = _ego_scans_and_duration(bag, settings.ego)
    record = out / 'record'
    shutil.rmtree(record, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    player_stats = out / 'player_stats.json'
    player_stats.unlink(missing_ok=True)
    player = player_spec(bag, settings.agents, rate=settings.rate, wait_s=settings.start_timeout_s,
                         wait_topics=wait_topics)
    player = replace(player, arguments=player.arguments + ('--stats-json', str(player_stats)))
    env = dict(os.environ if env is None else env)
    domain = env.get('ROS_DOMAIN_ID')
    topics = recorded_topics(settings.agents, settings.ego) if topics is None else topics
    statuses = [t for t, msgtype in topics.items() if msgtype == STRING]
    recorder = BagRecorder(record, topics, use_sim_time=not record_wall_time,
                           domain_id=int(domain) if domain else None)
    specs = node_specs(settings.agents, settings.ego) if nodes is None else nodes
    t0 = time.monotonic()
    with recorder, Launch(specs, params, env=env, log_dir=logs) as nodes:
        if settings.collaborator_nice:
            for k in range(settings.agents):
                detector = nodes.processes.get(f'agent{k}/lidar_detector')
                if k != settings.ego and detector is not None:
                    _renice(detector.pid, settings.collaborator_nice)
        while not all(recorder.counts[t] for t in statuses):
            _check_alive(nodes, logs)
            if time.monotonic() - t0 > settings.start_timeout_s:
                silent = [t for t in statuses if not recorder.counts[t]]
                raise UserError(logs, f'no status on {", ".join(silent)} after {settings.start_timeout_s:g} s; '
                                      'see the logs')
            time.sleep(0.2)
        t_ready = time.monotonic()
        deadline = t_ready + settings.start_timeout_s + duration_s / settings.rate + settings.drain_max_s
        bar = tqdm(total=ego_scans, desc='fused ego frames', unit='frame', disable=not progress)
        with Launch([player], None, env=env, log_dir=logs) as replay:
            last_count, last_change, player_done = 0, time.monotonic(), None
            while True:
                time.sleep(0.2)
                now = time.monotonic()
                _check_alive(nodes, logs)
                codes = _check_alive(replay, logs)
                count = recorder.counts[T.FUSED_OBJECTS]
                if count != last_count:
                    bar.update(count - last_count)
                    last_count, last_change = count, now
                if player_done is None and codes['bag_player'] is not None:
                    player_done = now
                if player_done is not None and (now - max(last_change, player_done) >= settings.drain_idle_s
                                                or now - player_done >= settings.drain_max_s):
                    break
                if now > deadline:
                    raise UserError(logs, f'the replay did not finish in {deadline - t_ready:.0f} s; see the logs')
            bar.close()
            codes = {**nodes.stop(), **replay.stop()}
    end = time.monotonic()
    stats = json.loads(player_stats.read_text()) if player_stats.exists() else None
    return {'record': str(record), 'record_clock': 'wall' if record_wall_time else 'ros',
            'recorded_messages': dict(recorder.counts), 'exit_codes': codes,
            'ego_scans_in_bag': ego_scans, 'player': stats,
            'wall_s': {'startup': round(t_ready - t0, 2), 'replay_and_drain': round(end - t_ready, 2),
                       'total': round(end - t0, 2)}}
