"""``coop-perception detect FILE...``: the shipped detector on a user's own point clouds (files read
by `data.point_files`), one ``<name>.json`` of boxes and one ``<name>.png`` BEV picture per scan.

A file is detected as it is, as one sweep, even when the detector stacks several sweeps
(``voxel.sweeps``): a file carries no sweep times to stack by.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from coop_perception.commands import Commands, add_detector_args, output_folder
from coop_perception.data.labels import CLASSES
from coop_perception.data.point_files import FORMATS, read_scans
from coop_perception.errors import UserError

FRAMES = {
    'sensor': 'origin at the LiDAR, z up (REP 103: x forward, y left); the ground is at z = -sensor height',
    'ground': 'origin on the ground below the LiDAR, z up (REP 103: x forward, y left); the LiDAR is at '
              'z = +sensor height',
}
DEFAULT_SCORE = 0.3
DEFAULT_OUT = 'detect_out'
RAISED_M = 0.3  # points this far above the ground are drawn darker: objects stand out from the road

DESCRIPTION = f"""Run the LiDAR detector on your own point clouds and write, per scan, OUT/<name>.json (boxes)
and OUT/<name>.png (a bird's-eye view of the points and boxes).

Inputs: {', '.join(FORMATS)} files and rosbag2 folders.
  .bin   float32 rows of 4 (KITTI: x, y, z, intensity) or 5 (nuScenes: + ring) values; the row
         length is told from the size and the data (--bin-columns states it)
  .pcd   .ply  read with open3d: x, y, z and an 'intensity' field if there is one
  .npy   an (N, 3+) array [x, y, z, (intensity, ...)] or a structured one with x, y, z fields
  bag    a rosbag2 folder: every sensor_msgs/PointCloud2 message on --topic is one scan, named
         <bag>_<index>, its header stamp in the JSON
Frames (--frame): metres, right-handed, z up, x and y level; boxes come back in the frame the
points were given in. Which way x points round z matters little (the detector is trained on
scans flipped and turned about z): KITTI's velodyne frame (x forward) and nuScenes' LIDAR_TOP
(x right, y forward) both work as they are. A tilted or z-down cloud has to be levelled first.
  sensor  {FRAMES['sensor']}
  ground  {FRAMES['ground']}
The sensor height (m above the ground) normalises heights inside the detector; by default it is
estimated per scan from the ground returns (--frame ground: the config's default_sensor_height).

JSON boxes: x, y, z (box centre), l, w, h (m), yaw (rad about +z from +x), label, score, vx, vy
(m/s) and the detector's uncertainties. Points with NaN or infinite coordinates are dropped and
counted in 'note'. A file that cannot be read is reported as one 'error: <file>: <problem>' line;
the other inputs are still detected, and the exit code is 2 if any failed."""


def add_cli(commands: Commands) -> None:
    p = commands.add('detect', cmd_detect, 'run the detector on your own .bin/.pcd/.ply/.npy scans or a bag; '
                                           'writes boxes as JSON and a BEV PNG', description=DESCRIPTION,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('files', nargs='+', metavar='FILE', help=f'point cloud files ({", ".join(FORMATS)}) or rosbag2 '
                                                            'folders')
    p.add_argument('--out', type=output_folder, default=DEFAULT_OUT, metavar='DIR',
                   help=f'folder for <name>.json and <name>.png (default: {DEFAULT_OUT}/, created if missing)')
    p.add_argument('--frame', choices=tuple(FRAMES), default='sensor', help='where z = 0 is (default: sensor)')
    p.add_argument('--sensor-height', type=_positive_metres, metavar='M',
                   help='the LiDAR\'s height above the ground, m (default: estimated per scan)')
    p.add_argument('--score-threshold', type=_probability, default=DEFAULT_SCORE, metavar='S',
                   help=f'keep boxes scoring at least this (default: {DEFAULT_SCORE}; the detector itself '
                        'stops at its config\'s decode.score_threshold)')
    p.add_argument('--topic', help='PointCloud2 topic of a bag (default: its only PointCloud2 topic)')
    p.add_argument('--bin-columns', type=int, choices=(4, 5), help='values per point of .bin files '
                                                                   '(default: told from each file)')
    p.add_argument('--no-png', action='store_true', help='write the JSON only')
    add_detector_args(p)


def _positive_metres(text: str) -> float:
    value = float(text)
    if not 0 < value < float('inf'):
        raise argparse.ArgumentTypeError(f'must be a distance > 0 m, got {text}')
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f'must be in [0, 1], got {text}')
    return value


def cmd_detect(args) -> int:
    from coop_perception.detection.commands import detector_from_args

    out = Path(args.out)
    failed: list[str] = []
    model, names = None, set()
    for scan in _readable_scans(args, failed):
        if model is None:  # loaded once a scan is at hand: a run on bad files fails fast
            model = detector_from_args(args)
            out.mkdir(parents=True, exist_ok=True)
        name = _unique(scan.name, names)
        result = detect_scan(model, scan, args)
        (out / f'{name}.json').write_text(json.dumps(result, indent=1))
        if not args.no_png:
            plot_scan(scan.points, result, model.cfg.voxel.range_xy, out / f'{name}.png')
        print(_summary(name, result, out))
    if len(args.files) > 1 and failed:
        print(f'{len(failed)} of {len(args.files)} inputs failed: {", ".join(failed)}')
    return 2 if failed else 0


def _readable_scans(args, failed: list[str]):
    """The scans of every input in turn. An input that cannot be read (or stops being readable,
    in a bag) gets its one error line and is left, its name added to ``failed``; the rest go on."""
    for path in args.files:
        try:
            yield from read_scans(path, topic=args.topic, bin_columns=args.bin_columns)
        except UserError as err:
            print(f'error: {err.path}: {" ".join(err.problem.split())}', file=sys.stderr)
            failed.append(str(path))


def _unique(name: str, taken: set[str]) -> str:
    """``name``, or ``name_2``, ... when an earlier input of this run had it (a/0.bin, b/0.pcd)."""
    unique, k = name, 1
    while unique in taken:
        k += 1
        unique = f'{name}_{k}'
    taken.add(unique)
    return unique


def detect_scan(model, scan, args) -> dict:
    """One `Scan` through ``model.detect`` as one sweep -> its JSON result, boxes in the input's frame."""
    cfg = model.cfg.voxel
    points = scan.points
    given = args.sensor_height is not None
    if args.frame == 'ground':
        # Shifted into the sensor frame by a height that, unless given, is assumed: inside the
        # detector only heights above the ground count, so it changes nothing but the report.
        offset = args.sensor_height if given else (
            cfg.sensor_height if cfg.sensor_height != 'auto' else cfg.default_sensor_height)
        det = model.detect(points - np.array([0, 0, offset, 0], np.float32), sensor_height=offset)
        source = 'given' if given else 'assumed (--frame ground)'
    else:
        offset = 0.0
        det = model.detect(points, sensor_height=args.sensor_height)
        source = 'given' if given else ('config' if cfg.sensor_height != 'auto' else 'estimated')
    keep = det.scores >= args.score_threshold
    boxes = det.boxes[keep].copy()
    boxes[:, 2] += offset
    notes = [det.note] if det.note else []
    if cfg.use_intensity and not scan.has_intensity:
        notes.append('the input has no intensity; 0 used')
    result = {
        'source': str(scan.source), 'topic': scan.topic, 'message_index': scan.index, 'stamp_ns': scan.stamp_ns,
        'frame': args.frame, 'frame_meaning': FRAMES[args.frame],
        'points': len(points),
        'points_dropped': {k: int(getattr(det.stats, f'dropped_{k}'))
                           for k in ('nonfinite', 'out_of_range', 'point_cap', 'voxel_cap')},
        'has_intensity': scan.has_intensity,
        'sensor_height_m': float(det.sensor_height), 'sensor_height_source': source,
        'score_threshold': args.score_threshold, 'note': '; '.join(notes),
        'detector': {'weights': str(args.weights), 'config': str(args.config), 'sweeps': 1},
        'detect_ms': float(det.timings_ms.get('total', 0.0)),
        'boxes': [_box(b, det, i) for b, i in zip(boxes, np.flatnonzero(keep))],
    }
    return result


def _box(box: np.ndarray, det, i: int) -> dict:
    from coop_perception.detection.decode import UNCERTAINTY_FIELDS

    return {'label': CLASSES[int(det.labels[i])], 'score': float(det.scores[i]),
            **{k: float(v) for k, v in zip(('x', 'y', 'z', 'l', 'w', 'h', 'yaw'), box)},
            'vx': float(det.velocities[i, 0]), 'vy': float(det.velocities[i, 1]),
            'uncertainty': {k: float(v) for k, v in zip(UNCERTAINTY_FIELDS, det.uncertainty[i])}}


def _summary(name: str, result: dict, out: Path) -> str:
    counts = {}
    for b in result['boxes']:
        counts[b['label']] = counts.get(b['label'], 0) + 1
    kinds = ', '.join(f'{n} {label}' for label, n in counts.items())
    note = f"; {result['note']}" if result['note'] else ''
    return (f"{name}: {len(result['boxes'])} boxes >= {result['score_threshold']:g}{f' ({kinds})' if kinds else ''}, "
            f"{result['points']} points, sensor height {result['sensor_height_m']:.2f} m "
            f"({result['sensor_height_source']}), {result['detect_ms']:.0f} ms{note} -> {out / name}.json")


def plot_scan(points: np.ndarray, result: dict, range_xy, out_path: Path, max_points: int = 40000) -> None:
    """A BEV PNG of one scan in its input frame: its points (darker above the ground), the boxes
    coloured by class with their scores, the sensor (green arrow along +x) and the detector's range."""
    from .bev_plot import draw_boxes  # first: it selects the file-only matplotlib backend

    import matplotlib.pyplot as plt

    from coop_perception.data.ros_msgs import LABEL_COLORS

    pts = points[np.isfinite(points[:, :3]).all(axis=1)]
    if len(pts) > max_points:
        pts = pts[np.random.default_rng(0).choice(len(pts), max_points, replace=False)]
    ground_z = 0.0 if result['frame'] == 'ground' else -result['sensor_height_m']
    raised = pts[:, 2] > ground_z + RAISED_M
    fig, ax = plt.subplots(figsize=(9, 9), dpi=110)
    ax.scatter(pts[~raised, 0], pts[~raised, 1], s=0.1, color='0.75', rasterized=True)
    ax.scatter(pts[raised, 0], pts[raised, 1], s=0.3, color='0.35', rasterized=True)
    x0, y0, x1, y1 = range_xy
    ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ls=':', color='0.4', lw=0.8))
    boxes = np.array([[b[k] for k in ('x', 'y', 'z', 'l', 'w', 'h', 'yaw')] for b in result['boxes']]).reshape(-1, 7)
    labels = np.array([CLASSES.index(b['label']) for b in result['boxes']], np.int64)
    for c, name in enumerate(CLASSES):
        if (labels == c).any():
            draw_boxes(ax, boxes[labels == c], LABEL_COLORS[c], f'{name} ({int((labels == c).sum())})', lw=1.2)
    for b in result['boxes']:
        ax.text(b['x'], b['y'], f"{b['score']:.2f}", fontsize=6, ha='center', va='center')
    ax.arrow(0, 0, 4, 0, width=0.5, color='tab:green', zorder=5)
    ax.set_xlim(x0 - 2, x1 + 2)
    ax.set_ylim(y0 - 2, y1 + 2)
    ax.set_aspect('equal')
    ax.set_xlabel(f"x [m] ({result['frame']} frame)")
    ax.set_ylabel('y [m]')
    where = result['source'] + (f" {result['topic']} #{result['message_index']}" if result['topic'] else '')
    ax.set_title(f"{where}: {len(boxes)} boxes, score >= {result['score_threshold']:g}", fontsize=9)
    if len(boxes):
        ax.legend(loc='upper right', fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
