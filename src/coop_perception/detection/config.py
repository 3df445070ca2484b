"""Detector configuration: the YAML beside each checkpoint in ``models/``, parsed strictly.

Unknown or missing keys are errors so that a typo cannot silently fall back to a default
(`read_yaml_mapping` + `build_strict` do this for any dataclass, e.g. the fusion's training
settings in ``models/fusion.yaml``, optionally checking each value's type too). The
``voxel``, ``model`` and ``classes`` sections define what a checkpoint's weights mean; a checkpoint
whose stored config differs from its YAML there is rejected (see :mod:`.checkpoint`).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from coop_perception.data.labels import CLASSES
from coop_perception.errors import UserError

# Sections whose differences make a checkpoint's weights meaningless under the other config.
ARCHITECTURE_SECTIONS = ('classes', 'voxel', 'model')


@dataclass(frozen=True)
class VoxelConfig:
    range_xy: tuple[float, float, float, float]  # x_min, y_min, x_max, y_max in the sensor frame (m)
    z_range: tuple[float, float]  # metres above the ground below the sensor
    voxel_size: tuple[float, float, float]  # x, y, z (m)
    sensor_height: float | str  # metres above ground, or 'auto' (estimated from each scan)
    default_sensor_height: float  # used when 'auto' finds too little ground
    max_points: int  # scans with more in-range points are subsampled to this many
    max_voxels: int  # beyond this, voxels farthest from the sensor are dropped
    count_norm: float  # voxel point counts are divided by this (and clipped to 1) as a feature
    use_intensity: bool
    # Sweeps stacked per detection (detection.sweeps), the newest included; 1: one scan. Each
    # voxel then also carries its points' mean age over sweep_max_age_s, older sweeps are left out.
    sweeps: int = 1
    sweep_max_age_s: float = 0.25

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        """(D, H, W) = (z, y, x) voxel counts, the spconv spatial shape."""
        x0, y0, x1, y1 = self.range_xy
        vx, vy, vz = self.voxel_size
        return (round((self.z_range[1] - self.z_range[0]) / vz), round((y1 - y0) / vy),
                round((x1 - x0) / vx))

    @property
    def num_features(self) -> int:
        # offset from voxel centre (3), height above ground (1), point count (1), intensity (0/1),
        # age (0/1)
        return 5 + int(self.use_intensity) + int(self.sweeps > 1)


@dataclass(frozen=True)
class ModelConfig:
    encoder_channels: tuple[int, int, int]  # full-res SubM, stride-2 stage, BEV after z collapse
    backbone_channels: tuple[int, int]  # BEV stage at output stride, stage at twice that stride
    feature_channels: int  # shared BEV feature map (what collaborators send)
    head_channels: int
    dropout: float  # in the pointwise head; MC dropout samples the same masks at inference


@dataclass(frozen=True)
class DecodeConfig:
    score_threshold: float
    pre_nms_top_k: int
    nms_iou: tuple[float, ...]  # rotated BEV IoU threshold per class
    max_boxes: int
    mc_passes: int  # 0 disables MC dropout (epistemic columns become NaN)
    mc_seed: int  # MC masks are drawn from a seeded generator so detections are reproducible
    # m/s: typical error of the velocity head on moving objects (measured on val, models/detector.md),
    # the noise a tracker gives its velocities; 0: the head's velocity is not a measurement (one sweep)
    velocity_std: float = 0.0


@dataclass(frozen=True)
class TargetConfig:
    gaussian_overlap: float  # CenterPoint's min_overlap for the heatmap gaussian radius
    min_radius: int  # cells
    max_objects: int  # per scan; more are dropped (farthest first)


@dataclass(frozen=True)
class AugmentConfig:
    rotation: float  # uniform global yaw in [-rotation, rotation] (rad)
    flip: bool  # random flips across the x and y axes
    scale: tuple[float, float]  # uniform global scale range
    # With several sweeps: the chance that an example is trained on its newest sweep alone, so that
    # the first scan of a run, a scan without a pose and a single file are still detected well.
    single_sweep: float = 0.0
    # Ground-truth sampling (detection.gt_database): objects of each class (in `classes` order)
    # pasted into every example from other training scans with at least this many returns; 0: off.
    gt_sampling: tuple[int, ...] = (0, 0, 0, 0)
    gt_sampling_min_points: int = 5


@dataclass(frozen=True)
class LossWeights:
    heatmap: float
    regression: float
    nll: float  # heteroscedastic Laplace NLL of x, y, yaw with the log-variance heads


@dataclass(frozen=True)
class TrainConfig:
    seed: int
    iterations: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_iterations: int
    grad_clip: float
    checkpoint_every: int
    log_every: int
    loss_weights: LossWeights
    # offset x, y, z, log l, w, h, sin, cos, vx, vy
    code_weights: tuple[float, float, float, float, float, float, float, float, float, float]
    augment: AugmentConfig


@dataclass(frozen=True)
class RuntimeConfig:
    # Backbone and head under bfloat16 autocast (training and inference); 'auto' where the CPU
    # has AMX (detection.model.native_bf16), where it is several times faster than float32.
    bf16: bool | str
    # torch threads for the process running the detector (0: torch's default). Entry points apply
    # it with model.apply_threads(); on shared cores one thread avoids stalls of 10x and more.
    threads: int


@dataclass(frozen=True)
class ScanVelocityConfig:
    """Velocities measured by registering each vehicle's points against the sensor's previous
    sweeps (detection.scan_velocity); a sender-side step after the network, not part of it."""
    # sweeps used, the newest included (< 2: off); older ones than max_age_s are left out
    sweeps: int = 4
    max_age_s: float = 0.35
    classes: tuple[str, ...] = ('car', 'truck')  # classes measured
    min_score: float = 0.3             # lower-scored detections are not measured
    cell_m: float = 0.1                # raster cell of the registration (m)
    blur_cells: float = 1.0            # Gaussian blur of the rasters (cells)
    max_speed: float = 20.0            # m/s: displacement searched along the box's length
    lateral_m: float = 0.6             # m: displacement searched across it
    min_points: int = 10               # above-ground points needed in each sweep's crop
    agree_m_s: float = 2.0             # sweeps' estimates further apart: not measured
    # another shift >= 0.5 m away overlapping the points this well relative to the best: not measured
    max_ambiguity: float = 0.85
    shift_noise_m: float = 0.09        # noise of one registration at min_points points (m)
    ground_clearance_m: float = 0.3    # points this close above the box's bottom are ground

    @property
    def on(self) -> bool:
        return self.sweeps >= 2


@dataclass(frozen=True)
class DetectorConfig:
    classes: tuple[str, ...]
    voxel: VoxelConfig
    model: ModelConfig
    decode: DecodeConfig
    target: TargetConfig
    runtime: RuntimeConfig
    train: TrainConfig = field(repr=False)
    # sender-side velocity measurement; off for configs from before it existed
    scan_velocity: ScanVelocityConfig = ScanVelocityConfig(sweeps=1)

    @property
    def sweeps_needed(self) -> int:
        """Sweeps a caller stacks per scan: the network's and the velocity measurement's."""
        return max(self.voxel.sweeps, self.scan_velocity.sweeps)

    @property
    def sweep_max_age_s(self) -> float:
        return max(self.voxel.sweep_max_age_s, self.scan_velocity.max_age_s if self.scan_velocity.on else 0.0)

    @property
    def output_stride(self) -> int:
        return 2

    @property
    def cell_size(self) -> float:
        return self.voxel.voxel_size[0] * self.output_stride

    @property
    def bev_shape(self) -> tuple[int, int]:
        _, H, W = self.voxel.grid_shape
        return H // self.output_stride, W // self.output_stride

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = '<dict>', *, defaults_ok: bool = False) -> 'DetectorConfig':
        """``defaults_ok``: keys added later with a default may be absent (a checkpoint's stored
        config from before they existed); a YAML file must name every key."""
        cfg = _build(cls, d, source, '', defaults_ok=defaults_ok)
        _validate(cfg, source)
        return cfg


def load_config(path: str | Path) -> DetectorConfig:
    return DetectorConfig.from_dict(read_yaml_mapping(path, 'detector config'), str(path))


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """The YAML mapping in ``path``; a UserError naming the file when it is unreadable or not a
    mapping (``what``: the kind of file, for the message)."""
    path = Path(path)
    try:
        d = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UserError(path, f'cannot read {what}: {e}') from e
    if not isinstance(d, dict):
        raise UserError(path, f'{what} must be a mapping')
    return d


def build_strict(cls: type, d: Any, source: str, *, check_types: bool = False) -> Any:
    """The dataclass ``cls`` (nested dataclass fields included) from the plain dict ``d``, e.g. a
    YAML file's mapping. Unknown or missing keys are a UserError naming ``source`` and the dotted
    section; lists become tuples. With ``check_types`` so is a value that does not fit its field's
    annotation, naming the dotted key (an int fits a float, a bool fits no number)."""
    return _build(cls, d, source, '', check_types)


def with_overrides(cfg: DetectorConfig, **sections: dict[str, Any]) -> DetectorConfig:
    """A copy of ``cfg`` with some keys replaced, e.g. ``with_overrides(cfg, decode={'mc_passes': 4})``."""
    d = cfg.to_dict()
    for name, values in sections.items():
        _merge(d, name, values)
    return DetectorConfig.from_dict(d, '<overrides>')


def config_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = '') -> list[str]:
    """Human-readable differences between two plain config dicts, one dotted key per line."""
    out = []
    for k in sorted(set(a) | set(b)):
        key = f'{prefix}{k}'
        if k not in a or k not in b:
            out.append(f'{key}: {"missing" if k not in a else a[k]!r} vs {"missing" if k not in b else b[k]!r}')
        elif isinstance(a[k], dict) and isinstance(b[k], dict):
            out.extend(config_diff(a[k], b[k], key + '.'))
        elif a[k] != b[k]:
            out.append(f'{key}: {a[k]!r} vs {b[k]!r}')
    return out


def _merge(d: dict, key: str, values: Any) -> None:
    if isinstance(values, dict):
        for k, v in values.items():
            _merge(d[key], k, v)
    else:
        d[key] = values


def _to_plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_plain(v) for v in x]
    return x


def _build(cls: type, d: Any, source: str, where: str, check_types: bool = False,
           defaults_ok: bool = False) -> Any:
    if not isinstance(d, dict):
        raise UserError(source, f'{where or "config"}: expected a mapping, got {d!r}')
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    optional = {n for n, f in fields.items() if defaults_ok and (
        f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING)}
    unknown, missing = set(d) - set(fields), set(fields) - set(d) - optional
    if unknown or missing:
        parts = ([f'unknown keys {sorted(unknown)}'] if unknown else []) + (
            [f'missing keys {sorted(missing)}'] if missing else [])
        raise UserError(source, f'{where or "config"}: ' + ', '.join(parts))
    kwargs = {}
    for name in fields:
        if name not in d:
            continue
        ftype = hints[name]
        value = d[name]
        if dataclasses.is_dataclass(ftype):
            value = _build(ftype, value, source, f'{where}{name}.', check_types, defaults_ok)
        else:
            if check_types and not _fits(value, ftype):
                raise UserError(source, f'{where}{name}: expected {_type_name(ftype)}, got {value!r}')
            if isinstance(value, list):
                value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def _fits(value: Any, hint: Any) -> bool:
    """Whether a plain (YAML) value fits a field annotation: int, float, bool, str, None, unions
    and tuples of them; other annotations are not checked."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(v, args[0]) for v in value)
        return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is type(None):
        return value is None
    if origin is None and isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _type_name(hint: Any) -> str:
    return hint.__name__ if typing.get_origin(hint) is None and isinstance(hint, type) else str(hint)


def _validate(cfg: DetectorConfig, source: str) -> None:
    def fail(msg):
        raise UserError(source, msg)

    if tuple(cfg.classes) != CLASSES:
        fail(f'classes {list(cfg.classes)} must equal coop_perception.data.labels.CLASSES {list(CLASSES)}')
    v = cfg.voxel
    x0, y0, x1, y1 = v.range_xy
    for extent, size, name in ((x1 - x0, v.voxel_size[0], 'x'), (y1 - y0, v.voxel_size[1], 'y'),
                               (v.z_range[1] - v.z_range[0], v.voxel_size[2], 'z')):
        n = extent / size
        if extent <= 0 or abs(n - round(n)) > 1e-6:
            fail(f'voxel: {name} extent {extent} is not a positive multiple of voxel size {size}')
    D, H, W = v.grid_shape
    if H % 4 or W % 4 or D % 2:
        # two stride-2 stages in the backbone and one in the encoder (z included)
        fail(f'voxel: grid (z, y, x) = {(D, H, W)} must have H, W divisible by 4 and D by 2')
    if v.voxel_size[0] != v.voxel_size[1]:
        fail('voxel: x and y voxel sizes must be equal (square BEV cells)')
    if not (v.sensor_height == 'auto' or isinstance(v.sensor_height, (int, float))):
        fail(f"voxel.sensor_height must be a number or 'auto', got {v.sensor_height!r}")
    if v.sweeps < 1 or v.sweep_max_age_s <= 0 or not 0.0 <= cfg.train.augment.single_sweep <= 1.0:
        fail('voxel.sweeps must be >= 1, voxel.sweep_max_age_s > 0 and train.augment.single_sweep in [0, 1]')
    if len(cfg.decode.nms_iou) != len(cfg.classes):
        fail(f'decode.nms_iou needs one threshold per class ({len(cfg.classes)})')
    if cfg.decode.mc_passes < 0 or not 0.0 <= cfg.model.dropout < 1.0:
        fail('decode.mc_passes must be >= 0 and model.dropout in [0, 1)')
    if cfg.runtime.bf16 not in (True, False, 'auto'):
        fail(f"runtime.bf16 must be true, false or 'auto', got {cfg.runtime.bf16!r}")
    if not isinstance(cfg.runtime.threads, int) or cfg.runtime.threads < 0:
        fail('runtime.threads must be an integer >= 0')
    aug = cfg.train.augment
    if (len(aug.gt_sampling) != len(cfg.classes) or any(n < 0 for n in aug.gt_sampling)
            or aug.gt_sampling_min_points < 1):
        fail(f'train.augment.gt_sampling must be {len(cfg.classes)} counts >= 0 (one per class) and '
             'train.augment.gt_sampling_min_points >= 1')
    lo, hi = cfg.train.augment.scale
    if not 0 < lo <= hi:
        fail('train.augment.scale must be 0 < low <= high')
    sv = cfg.scan_velocity
    if sv.sweeps < 1 or not set(sv.classes) <= set(cfg.classes):
        fail(f'scan_velocity: sweeps must be >= 1 and classes among {list(cfg.classes)}')
    if min(sv.max_age_s, sv.cell_m, sv.blur_cells, sv.max_speed, sv.shift_noise_m) <= 0 or \
            min(sv.lateral_m, sv.min_score, sv.agree_m_s, sv.ground_clearance_m) < 0 or sv.min_points < 1 \
            or not 0 < sv.max_ambiguity <= 1:
        fail('scan_velocity: max_age_s, cell_m, blur_cells, max_speed and shift_noise_m must be > 0, '
             'lateral_m, min_score, agree_m_s and ground_clearance_m >= 0, min_points >= 1, max_ambiguity in (0, 1]')
