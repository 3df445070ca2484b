"""Published LiDAR sensor models for the synthetic generator (`synth --lidar NAME`).

Each profile is a beam table and the datasheet's range, range accuracy and azimuth resolution at
10 Hz (used as it is at any `synth --rate`), plus a default mounting height. Ring ids are
elevation ranks, top beam first (`lidar.LidarConfig`), never the maker's laser numbering.

Values the datasheets do not give are marked "assumed": the random dropout (no maker publishes
one; all keep the carla32 share), the intensity noise and the mounting heights without a dataset
behind them. Intensity everywhere is the generator's model (surface reflectivity x incidence,
0..255 like a Velodyne's calibrated reflectivity byte).
"""
from __future__ import annotations

from dataclasses import dataclass

from .lidar import LidarConfig, uniform_beams

DEFAULT_PROFILE = 'carla32'
MIXED = 'mixed'                       # every profile, one drawn per agent and scene
# Datasheets state maximum range for a target of about this (Lambertian) reflectivity; HDL-64E
# S2/S3: 120 m at ~0.80, 50 m at ~0.10 (lidar.LidarConfig.reference_reflectivity).
DATASHEET_REFLECTIVITY = 0.8
RANDOM_DROPOUT = 0.01                 # assumed (see above)


@dataclass(frozen=True)
class SensorProfile:
    name: str
    description: str
    lidar: LidarConfig
    # m above the ground for a vehicle's LiDAR; None: on the roof at ScenarioConfig.roof_clearance
    # (a road-side unit always keeps ScenarioConfig.rsu_height)
    mount_height: float | None


def _hdl64e_beams() -> tuple[float, ...]:
    """HDL-64E S2/S3: two blocks of 32 lasers; upper +2.0 to -8.33 deg in 1/3 deg steps, lower
    from -8.83 to the datasheet's -24.9 deg (about 1/2 deg steps). A unit's calibration file moves
    each beam by a few tenths of a degree."""
    return uniform_beams(2.0, -8.33, 32) + uniform_beams(-8.83, -24.9, 32)


# VLP-32C User Manual (63-9325), laser vertical angles, sorted top first: 15 to -25 deg, densest
# (1/3 deg) between +1.667 and -4 deg around the horizon.
VLP32C_BEAMS = (15.0, 10.333, 7.0, 4.667, 3.333, 2.333, 1.667, 1.333, 1.0, 0.667, 0.333, 0.0,
                -0.333, -0.667, -1.0, -1.333, -1.667, -2.0, -2.333, -2.667, -3.0, -3.333, -3.667, -4.0,
                -4.667, -5.333, -6.148, -7.254, -8.843, -11.31, -15.639, -25.0)

# HDL-32E User Manual (63-9113): 32 lasers at 4/3 deg spacing, +10.67 to -30.67 deg, as printed.
HDL32E_BEAMS = tuple(round((32 - 4 * k) / 3, 2) for k in range(32))


def _ouster_os1(beams: int) -> LidarConfig:
    """Ouster OS1 datasheet (rev 6), "uniform" beam configuration: 45 deg vertical field of view
    (+22.5 to -22.5 deg); 1024 columns at 10 Hz (the default lidar mode); 120 m at 80%
    reflectivity; range accuracy +-3 cm. Minimum range 0.5 m assumed (it differs by revision)."""
    return LidarConfig(elevations_deg=uniform_beams(22.5, -22.5, beams), azimuth_res_deg=360 / 1024,
                       max_range=120.0, min_range=0.5, range_noise=0.03, dropout=RANDOM_DROPOUT,
                       intensity_noise=0.03, reference_reflectivity=DATASHEET_REFLECTIVITY)


PROFILES = {p.name: p for p in (
    # The generator's original model: CARLA's ray-cast LiDAR as V2X-Sim uses it (32 channels spread
    # evenly between the upper and lower field of view, no reflectivity limit) over the HDL-32E's
    # field of view, 70 m. The shipped numbers are measured on it: its scans must not change.
    SensorProfile('carla32', 'V2X-Sim/CARLA 32-channel ray-cast LiDAR (default)',
                  LidarConfig(elevations_deg=uniform_beams(10.67, -30.67, 32), azimuth_res_deg=0.2,
                              max_range=70.0, min_range=1.0, range_noise=0.02, dropout=RANDOM_DROPOUT,
                              intensity_noise=0.03),
                  mount_height=None),
    # HDL-32E datasheet / manual: up to 100 m, accuracy < 2 cm (1 sigma at 25 m), 0.16 deg at 600 rpm;
    # minimum range assumed as carla32's. Mounted 1.84 m above the ground as nuScenes' LIDAR_TOP.
    SensorProfile('hdl32e', 'Velodyne HDL-32E',
                  LidarConfig(elevations_deg=HDL32E_BEAMS, azimuth_res_deg=0.16, max_range=100.0,
                              min_range=1.0, range_noise=0.02, dropout=RANDOM_DROPOUT, intensity_noise=0.03,
                              reference_reflectivity=DATASHEET_REFLECTIVITY),
                  mount_height=1.84),
    # VLP-32C datasheet: 200 m, accuracy +-3 cm, 0.1-0.4 deg azimuth at 5-20 Hz (0.2 deg at 10 Hz).
    # Minimum range: Velodyne units return nothing closer than ~0.9 m (the ROS velodyne driver's
    # min_range). Height assumed (roof rack).
    SensorProfile('vlp32c', 'Velodyne VLP-32C (Ultra Puck)',
                  LidarConfig(elevations_deg=VLP32C_BEAMS, azimuth_res_deg=0.2, max_range=200.0,
                              min_range=0.9, range_noise=0.03, dropout=RANDOM_DROPOUT, intensity_noise=0.03,
                              reference_reflectivity=DATASHEET_REFLECTIVITY),
                  mount_height=1.9),
    # HDL-64E S2/S3 datasheet: 120 m at ~0.80 (50 m at ~0.10) reflectivity, accuracy < 2 cm (1 sigma),
    # ~1.33 M points/s over 64 lasers -> 0.1728 deg at 10 Hz; minimum range as the VLP-32C's.
    # Mounted 1.73 m high as in KITTI.
    SensorProfile('hdl64e', 'Velodyne HDL-64E S2/S3',
                  LidarConfig(elevations_deg=_hdl64e_beams(), azimuth_res_deg=0.1728, max_range=120.0,
                              min_range=0.9, range_noise=0.02, dropout=RANDOM_DROPOUT, intensity_noise=0.03,
                              reference_reflectivity=DATASHEET_REFLECTIVITY),
                  mount_height=1.73),
    # Heights assumed (roof mount).
    SensorProfile('os1-64', 'Ouster OS1-64 (uniform beams)', _ouster_os1(64), mount_height=1.8),
    SensorProfile('os1-128', 'Ouster OS1-128 (uniform beams)', _ouster_os1(128), mount_height=1.8),
)}


def parse_profiles(text: str) -> tuple[str, ...]:
    """``--lidar`` value -> profile names the agents draw from: one name, ``mixed`` (all of them)
    or a comma-separated list. Raises ValueError naming the unknown ones."""
    if text == MIXED:
        return tuple(PROFILES)
    names = tuple(n.strip() for n in text.split(','))
    unknown = [n for n in names if n not in PROFILES]
    if unknown:
        raise ValueError(f'unknown LiDAR profile {", ".join(map(repr, unknown))} '
                         f'(choose from {", ".join(PROFILES)}, {MIXED}, or a comma-separated list)')
    return names
