"""Point clouds from the files people have: ``.bin`` (KITTI / nuScenes float32 rows), ``.pcd`` and
``.ply`` (open3d), ``.npy`` and one PointCloud2 topic of a rosbag2 folder.

Every reader gives the same thing, a `Scan`: (N, 4) float32 ``[x, y, z, intensity]`` in the file's
own frame, metres. Whatever a user gave that cannot be read as points (a missing file, a wrong
row length, a truncated file, garbage, no point with finite coordinates) is a one-line UserError
naming the file. Points with some non-finite values are kept: the detector drops and counts them.
"""
from __future__ import annotations

import ctypes
import io
import os
import re
import tempfile
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import UserError
from .pcd_bin import ROW_LENGTHS, row_length

FORMATS = ('.bin', '.pcd', '.ply', '.npy')  # plus a rosbag2 folder
BAG_STORAGE_FILES = ('.mcap', '.db3')
XYZ = ('x', 'y', 'z')


@dataclass
class Scan:
    """One point cloud read from a user's input."""
    source: Path                 # the file or bag folder
    name: str                    # output stem: the file name without its format suffix; '<bag>_<index>' in a bag
    points: np.ndarray           # (N, 4) float32 [x, y, z, intensity], metres, the input's frame
    has_intensity: bool          # False: the input has none and column 3 is 0
    topic: str | None = None     # of a bag message
    index: int | None = None     # position of a bag message on its topic, from 0
    stamp_ns: int | None = None  # header stamp of a bag message


def read_scans(path, *, topic: str | None = None, bin_columns: int | None = None) -> Iterator[Scan]:
    """The scans of one input: a file gives one, a rosbag2 folder one per message on ``topic``
    (None: its only PointCloud2 topic). ``bin_columns`` (4 or 5): the row length of a ``.bin``,
    None: decided from its size and data (`pcd_bin.row_length`)."""
    path = Path(path)
    if path.is_dir():
        yield from _bag_scans(path, topic)
        return
    if not path.exists():
        raise UserError(path, 'no such file')
    suffix = path.suffix.lower()
    if suffix in BAG_STORAGE_FILES:
        raise UserError(path, 'give the rosbag2 folder (the one holding metadata.yaml), not its storage file')
    readers = {'.bin': lambda: _read_bin(path, bin_columns), '.pcd': lambda: _read_open3d(path),
               '.ply': lambda: _read_open3d(path), '.npy': lambda: _read_npy(path)}
    if suffix not in readers:
        raise UserError(path, f'unknown point cloud format {suffix or "(no suffix)"!r}: use '
                              f'{", ".join(FORMATS)} or a rosbag2 folder')
    try:
        points, has_intensity = readers[suffix]()
    except OSError as err:
        raise UserError(path, f'cannot read: {err.strerror or err}') from None
    yield Scan(path, _stem(path), _usable(points, path), has_intensity)


def _stem(path: Path) -> str:
    # nuScenes sweeps are named '<token>.pcd.bin': both suffixes go
    name = path.name[:-len(path.suffix)]
    return name[:-4] if name.lower().endswith('.pcd') else name


def _usable(points: np.ndarray, path: Path) -> np.ndarray:
    """``points`` if some point has finite x, y, z; else a UserError: nothing to detect in."""
    if len(points) == 0:
        raise UserError(path, 'holds no points')
    if not np.isfinite(points[:, :3]).all(axis=1).any():
        raise UserError(path, f'no usable point: all {len(points)} have NaN or infinite coordinates')
    return points


def _with_intensity(xyz: np.ndarray, intensity: np.ndarray | None) -> np.ndarray:
    """(N, 3) + (N,) or None -> (N, 4) float32."""
    out = np.zeros((len(xyz), 4), np.float32)
    out[:, :3] = xyz
    if intensity is not None:
        out[:, 3] = intensity
    return out


# --------------------------------------------------------------------------- .bin
def _read_bin(path: Path, columns: int | None) -> tuple[np.ndarray, bool]:
    """KITTI (x, y, z, intensity) or nuScenes (+ ring) float32 rows."""
    size = path.stat().st_size
    if size % 4:
        raise UserError(path, f'truncated: {size} bytes is not a whole number of float32')
    raw = np.fromfile(path, dtype=np.float32)
    if raw.size == 0:
        raise UserError(path, 'holds no points (empty file)')
    finite = np.isfinite(raw)
    if not finite.any():
        raise UserError(path, 'no usable point: every value is NaN or infinite')
    if columns is None:
        # The dropped returns some drivers write as NaN must not make a sound file look damaged
        # to the row-length test, so they take part as zeros.
        try:
            columns = row_length(raw if finite.all() else np.where(finite, raw, np.float32(0)), path)
        except UserError as err:
            raise UserError(path, f'{err.problem}; --bin-columns {" or ".join(map(str, ROW_LENGTHS))} '
                                  'states the row length') from None
    elif raw.size % columns:
        raise UserError(path, f'truncated: {raw.size} float32 is not a whole number of {columns}-value rows')
    rows = raw.reshape(-1, columns)
    return _with_intensity(rows[:, :3], rows[:, 3]), True


# --------------------------------------------------------------------------- .npy
def _read_npy(path: Path) -> tuple[np.ndarray, bool]:
    """An (N, >=3) numeric array [x, y, z, (intensity, ...)], or a structured one with x, y, z
    (and intensity) fields."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, EOFError) as err:
        raise UserError(path, f'not a .npy array: {" ".join(str(err).split())}') from None
    if not isinstance(arr, np.ndarray):
        raise UserError(path, 'not a .npy array (an .npz archive?)')
    if arr.dtype.names:
        if not set(XYZ) <= set(arr.dtype.names):
            raise UserError(path, f'structured array without x, y, z fields (has {", ".join(arr.dtype.names)})')
        arr = arr.reshape(-1)
        intensity = arr['intensity'] if 'intensity' in arr.dtype.names else None
        return _with_intensity(np.column_stack([arr[n] for n in XYZ]), intensity), intensity is not None
    if arr.dtype.kind not in 'fiu':
        raise UserError(path, f'array of {arr.dtype}, expected numbers')
    if arr.ndim != 2 or arr.shape[1] < 3:
        raise UserError(path, f'array of shape {arr.shape}, expected (N, 3+) rows [x, y, z, (intensity)]')
    return _with_intensity(arr[:, :3], arr[:, 3] if arr.shape[1] > 3 else None), arr.shape[1] > 3


# --------------------------------------------------------------------------- .pcd / .ply
def _read_open3d(path: Path) -> tuple[np.ndarray, bool]:
    """Positions (and an 'intensity' attribute) by open3d's tensor reader, which keeps extra
    attributes and, unlike the legacy one, NaN points."""
    try:
        import open3d as o3d
    except ImportError as err:  # open3d also needs the system library libusb-1.0
        raise UserError(path, f'reading {path.suffix} files needs open3d, which cannot be imported here '
                              f'({" ".join(str(err).split())})') from None
    with _console_output() as console:
        cloud = o3d.t.io.read_point_cloud(str(path))
    if 'positions' not in cloud.point or cloud.is_empty():
        # open3d returns an empty cloud on a parse failure and says why only on the console
        why = _open3d_reason(console())
        raise UserError(path, f'open3d cannot read it: {why}' if why else 'holds no points')
    xyz = cloud.point.positions.numpy()
    intensity = cloud.point.intensity.numpy().reshape(-1) if 'intensity' in cloud.point else None
    return _with_intensity(xyz, intensity), intensity is not None


@contextmanager
def _console_output():
    """Capture what open3d prints (its warnings through Python's sys.stdout, RPly's errors by C
    stdio on file descriptor 2, which Python's redirection cannot catch); yields a function
    returning the text, ANSI colours removed, once the block is left."""
    text = []
    python_side = io.StringIO()
    with tempfile.TemporaryFile() as sink, redirect_stdout(python_side), redirect_stderr(python_side):
        saved = [os.dup(1), os.dup(2)]
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield lambda: ''.join(text)
        finally:
            ctypes.CDLL(None).fflush(None)  # C stdio buffers: out before the switch back
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            text.append(python_side.getvalue() + sink.read().decode('utf-8', 'replace'))
            text[0] = re.sub(r'\x1b\[[0-9;]*m', '', text[0])


def _open3d_reason(console: str) -> str:
    """Why open3d failed, from what it printed: its 'Read ... failed' lines (it also warns about
    unrelated things on the way), else all of it, on one line."""
    lines = [line.replace('[Open3D WARNING]', '').strip() for line in console.splitlines()]
    failed = [line for line in lines if 'fail' in line.lower() or line.startswith('RPly')]
    return ' '.join(' '.join(failed or lines).split())


# --------------------------------------------------------------------------- rosbag2
def _bag_scans(path: Path, topic: str | None) -> Iterator[Scan]:
    """One scan per sensor_msgs/PointCloud2 message on ``topic``, read lazily, in log order. A
    message without points is a scan without points (the detector says so), not an error: a bag
    may well start with one."""
    from . import ros_msgs
    from .bag import POINTCLOUD2, BagReader

    with BagReader(path) as bag:
        clouds = sorted(t for t, info in bag.topics.items() if info.msgtype == POINTCLOUD2)
        if topic is None:
            if len(clouds) != 1:
                raise UserError(path, f'{len(clouds)} PointCloud2 topics in the bag: choose one with --topic '
                                      f'({", ".join(clouds) or "none"})')
            topic = clouds[0]
        if topic not in bag.topics:
            raise UserError(path, f'no topic {topic} in the bag (PointCloud2 topics: {", ".join(clouds) or "none"})')
        if bag.topics[topic].msgtype != POINTCLOUD2:
            raise UserError(path, f'{topic} is {bag.topics[topic].msgtype}, expected {POINTCLOUD2}')
        if not bag.topics[topic].count:
            raise UserError(path, f'{topic} has no messages')
        for index, (_, _, msg) in enumerate(bag.messages([topic])):
            names = [f.name for f in msg.fields]
            if not set(XYZ) <= set(names):
                raise UserError(path, f'{topic} message {index}: no x, y, z fields (has {", ".join(names)})')
            try:
                xyzi = ros_msgs.cloud_to_points(msg, [*XYZ, *(['intensity'] if 'intensity' in names else [])])
            except ValueError as err:  # PointCloudError: a layout that does not match the buffer
                raise UserError(path, f'{topic} message {index}: {" ".join(str(err).split())}') from None
            intensity = xyzi[:, 3] if xyzi.shape[1] > 3 else None
            yield Scan(path, f'{path.name}_{index:05d}', _with_intensity(xyzi[:, :3], intensity), intensity is not None,
                       topic, index, ros_msgs.stamp_ns(msg.header.stamp))
