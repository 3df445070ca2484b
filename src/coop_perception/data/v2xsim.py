"""V2X-Sim 2.0 on-disk format (nuScenes tables + per-agent LiDAR sweeps): writer and reader.

Layout under the dataset root::

    {version}/scene.json, sample.json, sample_data.json, ego_pose.json, ...   (nuScenes tables)
    sweeps/LIDAR_TOP_id_{k}/scene_{n}_{frame:06d}.pcd.bin                   (float32 N x 5)

Our writer stores timestamps in microseconds, quaternions ``[w, x, y, z]``, annotation ``size`` as
``[w, l, h]``, ``translation`` as the box centre in the global frame and, in each
``calibrated_sensor`` row, the LiDAR model as ``lidar_profile`` (`sensor_profiles`). The reader serves our
scenes and the real V2X-Sim download alike: what differs between them (timestamp unit, category
vocabulary, ``sample_data.width``, per-agent point counts, 4- or 5-column sweeps) is detected when
a dataset is opened (`conventions`), and its API always gives microseconds. It also copes with
semantic-LiDAR channels, agents missing from samples and an absent lidarseg.json.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import UserError
from ..geometry import make_pose, matrix_to_quat_wxyz, points_in_boxes, quat_wxyz_to_yaw, yaw_to_quat_wxyz
from .conventions import Conventions, TimeBase, check_pose_chain, detect_time_base, pose_verdict
from .labels import category_coverage, category_to_label
from .pcd_bin import ROW_LENGTHS, read_pcd_bin, sweep_shape
from .visibility import CountCache

log = logging.getLogger(__name__)

DEFAULT_VERSION = 'v2.0-mini'          # what our writer produces unless told otherwise
VERSIONS = ('v2.0', 'v2.0-mini')       # metadata folders of the full release and the mini one
TABLES = ('log', 'map', 'scene', 'sample', 'sample_data', 'ego_pose', 'calibrated_sensor', 'sensor',
          'sample_annotation', 'instance', 'category', 'attribute', 'visibility')
LIDAR_CHANNEL = re.compile(r'^LIDAR_TOP_id_(\d+)$')
VISIBILITY_LEVELS = (('1', 'v0-40'), ('2', 'v40-60'), ('3', 'v60-80'), ('4', 'v80-100'))


def channel_name(agent: int) -> str:
    return f'LIDAR_TOP_id_{agent}'


def _token(*parts) -> str:
    """Deterministic 32-hex token, so the same scene always gets the same tokens."""
    return hashlib.md5('/'.join(map(str, parts)).encode()).hexdigest()


# ============================================================================ writer
@dataclass(frozen=True)
class Layout:
    """What the writer puts in the tables: our own format (the defaults) or another producer's
    conventions (`mimic.MIMICS`)."""
    version: str = DEFAULT_VERSION     # metadata folder it is usually written to
    frame_counters: bool = False       # timestamps are frame indices (needs synchronous capture)
    category_name: Callable[[str, int], str] | None = None  # (our category, instance id) -> name written
    width_is_point_count: bool = True  # else sample_data.width = 0, as nuScenes LiDAR rows
    agent_points: bool = True          # annotations carry agent_lidar_pts
    velocity: bool = True              # annotations carry velocity
    first_scene: int = 0               # scenes are named scene_{first_scene + n}
    lidar_profile: bool = True         # calibrated_sensor rows name the LiDAR model (our field)


OWN_LAYOUT = Layout()


class V2XSimWriter:
    """Write scenes frame by frame; tables are written by close()."""

    def __init__(self, root, version: str = DEFAULT_VERSION, dataset: str = 'synthetic',
                 layout: Layout = OWN_LAYOUT):
        self.root = Path(root)
        self.version = version
        self.dataset = dataset
        self.layout = layout
        self.tables: dict[str, list[dict]] = {t: [] for t in TABLES}
        self._sensors: dict[int, str] = {}
        self._categories: dict[str, str] = {}
        self._attributes: dict[str, str] = {}
        for level, desc in VISIBILITY_LEVELS:
            self.tables['visibility'].append({'token': level, 'level': desc,
                                              'description': f'visibility of the object {desc}%'})
        log = _token(dataset, 'log')
        self.tables['log'].append({'token': log, 'logfile': dataset, 'vehicle': 'v2x',
                                   'date_captured': '2026-11-29', 'location': 'synthetic-town'})
        self.tables['map'].append({'token': _token(dataset, 'map'), 'log_tokens': [log],
                                   'category': 'semantic_prior', 'filename': ''})
        self._log = log
        self._scene = None
        self._sd_index: dict[str, dict] = {}
        self._ann_index: dict[str, dict] = {}

    # -- helpers
    def _sensor(self, agent: int) -> str:
        if agent not in self._sensors:
            tok = _token(self.dataset, 'sensor', agent)
            self._sensors[agent] = tok
            self.tables['sensor'].append({'token': tok, 'channel': channel_name(agent),
                                          'modality': 'lidar'})
        return self._sensors[agent]

    def _named(self, table: str, cache: dict, name: str) -> str:
        if name not in cache:
            cache[name] = _token(self.dataset, table, name)
            self.tables[table].append({'token': cache[name], 'name': name, 'description': name})
        return cache[name]

    # -- scenes
    def begin_scene(self, name: str, description: str = ''):
        tok = _token(self.dataset, 'scene', name)
        self._scene = {'token': tok, 'log_token': self._log, 'nbr_samples': 0, 'name': name,
                       'description': description, 'first_sample_token': '', 'last_sample_token': ''}
        self._prev_sample = ''
        self._prev_sd: dict[int, str] = {}
        self._prev_ann: dict[int, str] = {}
        self._instances: dict[int, dict] = {}

    def _stamp(self, frame, timestamp_us: int) -> int:
        if not self.layout.frame_counters:
            return int(timestamp_us)
        if timestamp_us != frame.timestamp_us:
            raise ValueError('frame-counter timestamps need every agent to capture at the frame time '
                             '(ScenarioConfig.synchronous)')
        return int(frame.index)

    def add_frame(self, frame) -> None:
        """frame: a `synth.Frame` (or anything with the same fields)."""
        sc = self._scene
        name = sc['name']
        sample = _token(self.dataset, name, 'sample', frame.index)
        self.tables['sample'].append({'token': sample, 'timestamp': self._stamp(frame, frame.timestamp_us),
                                      'prev': self._prev_sample, 'next': '', 'scene_token': sc['token']})
        if self._prev_sample:
            self.tables['sample'][-2]['next'] = sample
        else:
            sc['first_sample_token'] = sample
        sc['last_sample_token'] = sample
        sc['nbr_samples'] += 1
        self._prev_sample = sample

        for scan in frame.scans:
            self._add_scan(frame, scan, sample)
        self._add_annotations(frame, sample)

    def _add_scan(self, frame, scan, sample: str) -> None:
        """One agent's sweep file, ego pose, calibration (once a scene) and sample_data row."""
        lay, name = self.layout, self._scene['name']
        k = scan.agent_id
        ch = channel_name(k)
        rel = f'sweeps/{ch}/{name}_{frame.index:06d}.pcd.bin'
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        np.ascontiguousarray(scan.points, dtype=np.float32).tofile(path)
        sd = _token(self.dataset, name, 'sd', frame.index, k)
        ep = _token(self.dataset, name, 'ep', frame.index, k)
        cs = _token(self.dataset, name, 'cs', k)
        self.tables['ego_pose'].append({
            'token': ep, 'timestamp': self._stamp(frame, scan.timestamp_us),
            'rotation': matrix_to_quat_wxyz(scan.T_world_ego[:3, :3]).tolist(),
            'translation': scan.T_world_ego[:3, 3].tolist()})
        if k not in self._prev_sd:  # the mount is fixed within a scene
            profile = {'lidar_profile': scan.lidar_profile} if self.layout.lidar_profile else {}
            self.tables['calibrated_sensor'].append({
                'token': cs, 'sensor_token': self._sensor(k),
                'translation': scan.T_ego_sensor[:3, 3].tolist(),
                'rotation': matrix_to_quat_wxyz(scan.T_ego_sensor[:3, :3]).tolist(),
                'camera_intrinsic': [], **profile})
        prev = self._prev_sd.get(k, '')
        self.tables['sample_data'].append({
            'token': sd, 'sample_token': sample, 'ego_pose_token': ep,
            'calibrated_sensor_token': cs, 'timestamp': self._stamp(frame, scan.timestamp_us),
            'fileformat': 'pcd', 'is_key_frame': True, 'height': 0,
            'width': int(len(scan.points)) if lay.width_is_point_count else 0,
            'filename': rel, 'prev': prev, 'next': ''})
        if prev:
            self._sd_index[prev]['next'] = sd
        self._sd_index[sd] = self.tables['sample_data'][-1]
        self._prev_sd[k] = sd

    def _add_annotations(self, frame, sample: str) -> None:
        """The frame's boxes as sample_annotation rows, their instances and categories."""
        lay, name = self.layout, self._scene['name']
        agents = sorted(frame.agent_points)
        for i, iid in enumerate(frame.instance_ids.tolist()):
            ann = _token(self.dataset, name, 'ann', frame.index, iid)
            inst = self._instances.get(iid)
            if inst is None:
                category = frame.categories[i] if lay.category_name is None else lay.category_name(
                    frame.categories[i], iid)
                inst = {'token': _token(self.dataset, name, 'inst', iid),
                        'category_token': self._named('category', self._categories, category),
                        'nbr_annotations': 0, 'first_annotation_token': ann, 'last_annotation_token': ann}
                self._instances[iid] = inst
                self.tables['instance'].append(inst)
            prev = self._prev_ann.get(iid, '')
            per_agent = {str(k): int(frame.agent_points[k][i]) for k in agents}
            total = sum(per_agent.values())
            x, y, z, l, w, h, yaw = frame.boxes[i].tolist()
            rec = {'token': ann, 'sample_token': sample, 'instance_token': inst['token'],
                   'visibility_token': _visibility(frame.agent_points, i),
                   'attribute_tokens': [self._named('attribute', self._attributes, frame.attributes[i])],
                   'translation': [x, y, z], 'size': [w, l, h],
                   'rotation': yaw_to_quat_wxyz(yaw).tolist(), 'prev': prev, 'next': '',
                   'num_lidar_pts': total, 'num_radar_pts': 0}
            if lay.velocity:
                rec['velocity'] = frame.velocities[i].tolist()
            if lay.agent_points:
                rec['agent_lidar_pts'] = per_agent
            if prev:
                self._ann_index[prev]['next'] = ann
            self._ann_index[ann] = rec
            self.tables['sample_annotation'].append(rec)
            inst['nbr_annotations'] += 1
            inst['last_annotation_token'] = ann
            self._prev_ann[iid] = ann

    def end_scene(self):
        self.tables['scene'].append(self._scene)
        self._scene = None

    def close(self):
        meta = self.root / self.version
        meta.mkdir(parents=True, exist_ok=True)
        for name, rows in self.tables.items():
            with open(meta / f'{name}.json', 'w') as fh:
                json.dump(rows, fh, indent=0)


def _visibility(agent_points: dict, i: int) -> str:
    best = max((int(c[i]) for c in agent_points.values()), default=0)
    return '4' if best >= 50 else '3' if best >= 15 else '2' if best >= 5 else '1'


# ============================================================================ reader
@dataclass
class SceneInfo:
    name: str
    token: str
    sample_tokens: list[str]


@dataclass
class AgentFrame:
    agent_id: int
    channel: str
    timestamp_us: int                 # capture time
    T_world_ego: np.ndarray           # (4, 4)
    T_ego_sensor: np.ndarray          # (4, 4)
    path: Path
    expected_points: int              # 0 when the dataset does not state it reliably (real V2X-Sim)
    sample_data_token: str
    row_length_hint: int | None = None  # the dataset's values per point, for files too small to tell
    lidar_profile: str | None = None  # sensor_profiles name of the LiDAR; None when not recorded

    @property
    def T_world_sensor(self) -> np.ndarray:
        return self.T_world_ego @ self.T_ego_sensor

    def load_points(self) -> np.ndarray:
        """(N, 5) float32 [x, y, z, intensity, ring] in the sensor frame (ring = -1 if unknown)."""
        return read_pcd_bin(self.path, self.expected_points, self.row_length_hint)

    @property
    def points(self) -> np.ndarray:
        """(N, 4) float32 [x, y, z, intensity] in the sensor frame."""
        return self.load_points()[:, :4]

    def num_points(self) -> int:
        return self.expected_points or len(self.load_points())


@dataclass
class GroundTruth:
    """Objects of one sample, world frame, at the sample timestamp."""
    boxes: np.ndarray                 # (M, 7) [x, y, z, l, w, h, yaw]
    velocities: np.ndarray            # (M, 2) m/s
    labels: np.ndarray                # (M,) index into labels.CLASSES, -1 for other categories
    categories: list[str]
    instance_tokens: list[str]
    agent_points: dict[int, np.ndarray] = field(default_factory=dict)  # agent -> (M,) counts

    def boxes_at(self, dt_s: float) -> np.ndarray:
        """Boxes moved with their velocity by dt_s seconds (e.g. to another agent's capture time)."""
        out = self.boxes.copy()
        out[:, :2] += self.velocities * dt_s
        return out


@dataclass
class Sample:
    scene_name: str
    scene_index: int
    frame_index: int
    token: str
    timestamp_us: int
    agents: dict[int, AgentFrame]
    gt: GroundTruth

    def agent_box(self, agent: int) -> int:
        """Index of the ground-truth box of the agent's own vehicle, or -1 (e.g. the RSU)."""
        a = self.agents[agent]
        dt = (a.timestamp_us - self.timestamp_us) * 1e-6
        if len(self.gt.boxes) == 0:
            return -1
        origin = np.array([[*a.T_world_ego[:2, 3], 0.0]])
        inside = points_in_boxes(origin, _flatten_z(self.gt.boxes_at(dt)))[:, 0]
        hits = np.nonzero(inside)[0]
        return int(hits[0]) if len(hits) else -1


class _Row(dict):
    """A table row: a field it lacks is a UserError naming the table file, not a KeyError."""

    def __init__(self, row: dict, path: Path):
        super().__init__(row)
        self.path = path

    def __missing__(self, key):
        raise UserError(self.path, f'row {self.get("token")!r} has no field {key!r}')


def _row_length_of(path: Path, width: int) -> int | None:
    """The values per point that make ``path`` hold ``width`` points, if any (None: no row length
    does, or the file is not there); tells the row length of files too small to tell it."""
    if not width or not path.is_file():
        return None
    floats = path.stat().st_size / 4
    return next((c for c in ROW_LENGTHS if floats == c * width), None)


def _flatten_z(boxes: np.ndarray) -> np.ndarray:
    """Boxes stretched to include z = 0 so a ground-level origin tests by BEV footprint only."""
    out = boxes.copy()
    out[:, 2] = 0.0
    out[:, 5] = 1e3
    return out


def metadata_folder(root: Path, version: str | None) -> Path:
    """``root/version``; without a version, whichever of VERSIONS holds a scene table."""
    if version:
        meta = root / version
        if meta.is_dir():
            return meta
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and (p / 'scene.json').exists())
    listed = f' (found: {", ".join(found)})' if found else ''
    if version:
        raise UserError(meta, 'metadata folder not found' + listed)
    release = [v for v in VERSIONS if v in found]
    if len(release) == 1:
        return root / release[0]
    if release:
        raise UserError(root, f'holds both {" and ".join(release)}: choose one with --version')
    raise UserError(root, f'no metadata folder {" or ".join(VERSIONS)}{listed}: name it with --version')


class V2XSimDataset:
    """Index over a V2X-Sim-format dataset, our own or the real download.

    version: the metadata folder (None: whichever of v2.0 and v2.0-mini exists). frame_period_s:
    seconds per frame, needed when the timestamps count frames. On opening, the conventions the
    data follows are detected (`conventions`, logged once). Raises UserError for missing or
    inconsistent files and for conventions the data cannot settle."""

    PROBE_SAMPLES = 3                 # samples the sweep and pose checks look at, at most
    PROBE_BOXES = 24                  # near boxes after which the pose check has seen enough
    NAMED_BAD_SWEEPS = 5              # bad LiDAR files an error names, at most

    def __init__(self, root, version: str | None = None, frame_period_s: float | None = None,
                 check_sweeps: bool = False):
        """check_sweeps: first check every LiDAR file against its sample_data row (reads them
        all) and raise one UserError naming the bad ones (`sweep_problems`)."""
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(self.root, 'is not a folder (expected a dataset folder)' if self.root.exists()
                            else 'dataset folder does not exist')
        self.meta = metadata_folder(self.root, version)
        with self._malformed():
            self._open(version, frame_period_s, check_sweeps)

    def _open(self, version: str | None, frame_period_s: float | None, check_sweeps: bool) -> None:
        """Read the tables, index them and detect the conventions (the constructor's work)."""
        t = {name: self._load(name) for name in ('scene', 'sample', 'sample_data', 'ego_pose',
                                                  'calibrated_sensor', 'sensor', 'sample_annotation',
                                                  'instance', 'category')}
        self._t = t
        self._index()
        if check_sweeps:
            self._raise_sweep_problems()
        self.time: TimeBase = detect_time_base(
            {sc.name: [t['sample'][tok]['timestamp'] for tok in sc.sample_tokens] for sc in self.scenes},
            np.array([sd['timestamp'] - t['sample'][tok]['timestamp']
                      for tok, per in self._lidar_sd.items() for sd in per.values()]),
            frame_period_s, self.meta / 'sample.json')
        probe = [(s, self.num_frames(s) // 2) for s in range(len(self.scenes)) if self.num_frames(s)]
        probe = probe[:self.PROBE_SAMPLES]
        row_lengths, self._width_is_count = self._check_sweeps(probe[:1])
        self._row_hint = max(row_lengths, key=row_lengths.get) if row_lengths else None
        counted = not all('agent_lidar_pts' in a for a in t['sample_annotation'].values())
        self._counts = CountCache(self.root, self.meta.name) if counted else None
        pose = check_pose_chain((self.sample(s, f) for s, f in probe), enough=self.PROBE_BOXES)
        pose['verdict'] = pose_verdict(pose, self.meta)
        used = {t['category'][i['category_token']]['name'] for i in t['instance'].values()}
        folder = self._counts.folder if self._counts else None
        self.conventions = Conventions(
            version=self.meta.name, version_given=bool(version), time=self.time,
            scene_order=[sc.name for sc in self.scenes], categories=category_coverage(used),
            row_lengths=dict(row_lengths), width_is_point_count=self._width_is_count,
            visibility='counted' if counted else 'annotations', count_cache=str(folder) if folder else None,
            pose=pose)
        notes = self.conventions.differences()
        if notes:
            log.warning('%s: conventions detected: %s', self.meta, '; '.join(notes))

    def _load(self, name: str) -> dict[str, dict]:
        """A table's rows by token; a file that is not a JSON list of rows with tokens is a
        UserError naming it, and so is a field that a row lacks when it is read (`_Row`)."""
        path = self.meta / f'{name}.json'
        try:
            rows = json.loads(path.read_text(encoding='utf-8'))
        except FileNotFoundError:
            raise UserError(path, 'table is missing') from None
        except OSError as exc:
            raise UserError(path, f'cannot read table: {exc.strerror}') from None
        except UnicodeDecodeError as exc:
            raise UserError(path, f'not UTF-8 text (byte offset {exc.start})') from None
        except json.JSONDecodeError as exc:
            raise UserError(path, f'not valid JSON ({exc.msg} at line {exc.lineno})') from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get('token'), str)
                                                 for r in rows):
            raise UserError(path, 'not a table: expected a JSON list of rows, each with a "token" string')
        return {r['token']: _Row(r, path) for r in rows}

    @contextmanager
    def _malformed(self):
        """Fields of the wrong type or shape (a string timestamp, a rotation of 3 numbers) are a
        damaged dataset, not a bug: one UserError naming the metadata folder."""
        try:
            yield
        except (TypeError, ValueError, AttributeError, IndexError) as exc:
            raise UserError(self.meta, f'malformed table field: {" ".join(str(exc).split())}') from None

    def _ref(self, table: str, token: str, by: str, from_table: str) -> dict:
        try:
            return self._t[table][token]
        except KeyError:
            raise UserError(self.meta / f'{from_table}.json',
                            f'{from_table} {by} refers to missing {table} token {token!r}') from None

    def _index(self):
        t = self._t
        # Scenes in table order (as the devkit and the V2X-Sim splits use them; a name sort would
        # put scene_10 before scene_2), samples by their prev/next chain.
        self.scenes: list[SceneInfo] = []
        for sc in t['scene'].values():
            tokens, tok = [], sc['first_sample_token']
            while tok:
                s = self._ref('sample', tok, sc['token'], 'scene' if not tokens else 'sample')
                tokens.append(tok)
                tok = s['next']
            self.scenes.append(SceneInfo(sc['name'], sc['token'], tokens))
        self._lidar_sd: dict[str, dict[int, dict]] = {}
        for sd in t['sample_data'].values():
            cs = self._ref('calibrated_sensor', sd['calibrated_sensor_token'], sd['token'], 'sample_data')
            sensor = self._ref('sensor', cs['sensor_token'], cs['token'], 'calibrated_sensor')
            m = LIDAR_CHANNEL.match(sensor['channel'])  # SEMLIDAR_TOP_id_k and cameras are skipped
            if not m or not sd.get('is_key_frame', True):
                continue
            self._ref('sample', sd['sample_token'], sd['token'], 'sample_data')
            self._ref('ego_pose', sd['ego_pose_token'], sd['token'], 'sample_data')
            self._lidar_sd.setdefault(sd['sample_token'], {})[int(m.group(1))] = sd
        self._anns: dict[str, list[dict]] = {}
        for ann in t['sample_annotation'].values():
            self._ref('sample', ann['sample_token'], ann['token'], 'sample_annotation')
            inst = self._ref('instance', ann['instance_token'], ann['token'], 'sample_annotation')
            self._ref('category', inst['category_token'], inst['token'], 'instance')
            self._anns.setdefault(ann['sample_token'], []).append(ann)

    def _check_sweeps(self, probe) -> tuple[Counter, bool]:
        """Values per point of the probe samples' sweeps (-> files) and whether sample_data.width
        is their point count (nuScenes LiDAR rows say 0). One file that matches its width settles
        the latter: a damaged file must not turn the others' counts off, it is reported as such."""
        lengths: Counter = Counter()
        width_is_count = False
        for s, f in probe:
            for sd in self._lidar_sd.get(self.scenes[s].sample_tokens[f], {}).values():
                points, columns = sweep_shape(self.root / sd['filename'])
                lengths[columns] += 1
                width_is_count |= int(sd.get('width') or 0) == points > 0
        return lengths, width_is_count

    def sweep_problems(self) -> tuple[list[tuple[Path, str]], int]:
        """Every key-frame LiDAR file that is missing, damaged or holds another number of points
        than its sample_data row says (when the rows count points at all: some row matches its
        file): ([(path, problem)], files checked). Reads every file."""
        problems, shapes = [], []
        rows = [sd for per in self._lidar_sd.values() for sd in per.values()]
        for sd in rows:
            path, width = self.root / sd['filename'], int(sd.get('width') or 0)
            try:
                shapes.append((path, width, *sweep_shape(path, _row_length_of(path, width))))
            except UserError as err:
                problems.append((path, err.problem))
            except OSError as err:
                problems.append((path, f'cannot read LiDAR file: {err.strerror}'))
        if any(width == points > 0 for _, width, points, _ in shapes):
            problems += [(path, f'{points} points of {columns} values, its sample_data row says {width} points')
                         for path, width, points, columns in shapes if width and width != points]
        return problems, len(rows)

    def _raise_sweep_problems(self) -> None:
        """One UserError naming the bad LiDAR files (`sweep_problems`), if there are any."""
        problems, total = self.sweep_problems()
        if len(problems) == 1:
            raise UserError(*problems[0])
        if problems:
            named = '; '.join(f'{path}: {problem}' for path, problem in problems[:self.NAMED_BAD_SWEEPS])
            more = len(problems) - self.NAMED_BAD_SWEEPS
            raise UserError(self.root, f'{len(problems)} of {total} LiDAR files are bad: {named}'
                            + (f'; and {more} more' if more > 0 else ''))

    # -- access
    def num_frames(self, scene_index: int) -> int:
        return len(self.scenes[scene_index].sample_tokens)

    def agents(self) -> list[int]:
        return sorted({k for per in self._lidar_sd.values() for k in per})

    def sample(self, scene_index: int, frame_index: int) -> Sample:
        if not 0 <= scene_index < len(self.scenes):
            raise UserError(self.meta, f'scene index {scene_index} out of range (0..{len(self.scenes) - 1})')
        scene = self.scenes[scene_index]
        if not 0 <= frame_index < len(scene.sample_tokens):
            raise UserError(self.meta, f'frame {frame_index} out of range for {scene.name} '
                                       f'(0..{len(scene.sample_tokens) - 1})')
        token = scene.sample_tokens[frame_index]
        with self._malformed():
            agents = {k: self._agent_frame(k, sd) for k, sd in sorted(self._lidar_sd.get(token, {}).items())}
            sample = Sample(scene.name, scene_index, frame_index, token, self._sample_us(token), agents,
                            self._ground_truth(token))
        if self._counts is not None:
            sample.gt.agent_points = self._counts.counts(sample)
        return sample

    def samples(self, scene_index: int | None = None):
        scenes = range(len(self.scenes)) if scene_index is None else [scene_index]
        for s in scenes:
            for f in range(self.num_frames(s)):
                yield self.sample(s, f)

    def _sample_us(self, token: str) -> int:
        return self.time.to_us(self._t['sample'][token]['timestamp'])

    def _agent_frame(self, agent: int, sd: dict) -> AgentFrame:
        ep = self._t['ego_pose'][sd['ego_pose_token']]
        cs = self._t['calibrated_sensor'][sd['calibrated_sensor_token']]
        return AgentFrame(
            agent_id=agent, channel=channel_name(agent), timestamp_us=self.time.to_us(sd['timestamp']),
            T_world_ego=make_pose(ep['translation'], quat_wxyz=ep['rotation']),
            T_ego_sensor=make_pose(cs['translation'], quat_wxyz=cs['rotation']),
            path=self.root / sd['filename'],
            expected_points=int(sd.get('width') or 0) if self._width_is_count else 0,
            sample_data_token=sd['token'], row_length_hint=self._row_hint,
            lidar_profile=cs.get('lidar_profile'))

    def _ground_truth(self, sample_token: str) -> GroundTruth:
        """Without per-agent counts when the dataset does not store them (`sample` adds them)."""
        anns = self._anns.get(sample_token, [])
        M = len(anns)
        boxes = np.zeros((M, 7))
        vel = np.zeros((M, 2))
        cats, insts = [], []
        agent_points: dict[int, np.ndarray] = {}
        yaws = quat_wxyz_to_yaw(np.array([a['rotation'] for a in anns], np.float64).reshape(-1, 4))
        for i, a in enumerate(anns):
            w, l, h = a['size']
            boxes[i] = [*a['translation'], l, w, h, yaws[i]]
            vel[i] = a['velocity'][:2] if 'velocity' in a else self._finite_difference_velocity(a)
            cats.append(self._t['category'][self._t['instance'][a['instance_token']]['category_token']]['name'])
            insts.append(a['instance_token'])
            for k, n in a.get('agent_lidar_pts', {}).items():
                agent_points.setdefault(int(k), np.zeros(M, np.int64))[i] = n
        labels = np.array([category_to_label(c) for c in cats], dtype=np.int64)
        return GroundTruth(boxes, vel, labels, cats, insts, agent_points if self._counts is None else {})

    def _finite_difference_velocity(self, ann: dict) -> np.ndarray:
        """Velocity from neighbouring annotations (as the nuScenes devkit does), else zero."""
        anns = self._t['sample_annotation']
        first = anns.get(ann['prev']) or ann
        last = anns.get(ann['next']) or ann
        if first is last:
            return np.zeros(2)
        dt = (self._sample_us(last['sample_token']) - self._sample_us(first['sample_token'])) * 1e-6
        if dt <= 0:
            return np.zeros(2)
        return (np.array(last['translation'][:2]) - np.array(first['translation'][:2])) / dt
