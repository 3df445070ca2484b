"""The ego's full BEV map, from its detector node to its fusion node (``coop/bev``).

The fusion needs the ego's whole feature map, not only ROIs, and the sensor height the detector
normalised heights with (estimated per scan when the config says ``auto``). Both travel in the
codec's wire layout with every non-zero cell (``select_occupied_cells``) and one extra float32
field, ``sensor_height``, repeated on every cell like the codec's per-ROI values; codec consumers
ignore the extra field. Features are int8 per cell, the same quantisation the offline feature
cache applies to the ego map, so the live fusion sees what offline evaluation sees.

The receiver rebuilds the feature map (``decode_ego_features``), which the fusion combines and
whose boxes the detector's head gives when no collaborator contributes; ``decode_ego_map`` runs
the head at once.

The scan's free-range profile (detection.free_range, ``FREE_RANGE_BINS`` values) rides in a
second extra float32 field, ``free_range``: cell i carries bin i's range (m) for i < B, the rest
0. A map with fewer cells than bins (a nearly empty scan) or from a detector without the field
carries none (``decode_free_range`` gives None), and the fusion then checks no free space.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Hashable, Sequence

import numpy as np

from coop_perception.data.pointcloud import PointCloudError, buffer_to_array, check_layout

from .codec import FeatureMessage, FeatureMessageError, decode, encode, make_message
from .sharing import select_occupied_cells

SENSOR_HEIGHT_FIELD = 'sensor_height'
FREE_RANGE_FIELD = 'free_range'
# A free range beyond this (m) is no LiDAR's: a corrupt map.
MAX_FREE_RANGE_M = 1000.0


def encode_ego_map(det, agent_id: Hashable, stamp_ns: int) -> tuple[list, bytes, int]:
    """Detections of one scan -> (fields, data, point_step) of the ``coop/bev`` PointCloud2."""
    # the profile rides at full resolution in its own field here, not as a collaborator's bytes
    msg = replace(make_message(det, select_occupied_cells(det), agent_id, stamp_ns), free_range=None)
    free = np.zeros(msg.num_cells, np.float32)
    if det.free_range is not None and msg.num_cells >= len(det.free_range):
        free[:len(det.free_range)] = det.free_range
    return encode(msg, {SENSOR_HEIGHT_FIELD: det.sensor_height, FREE_RANGE_FIELD: free})


def decode_ego_map(fields: Sequence, data, point_step: int, *, width: int, detector, agent_id: Hashable,
                   stamp_ns: int, height: int = 1, row_step: int | None = None,
                   is_bigendian: bool = False):
    """A received ``coop/bev`` cloud -> Detections of ``detector`` (head run on the map, no MC
    passes: the fusion uses no ego uncertainty). Raises FeatureMessageError like codec.decode."""
    features, sensor_height = decode_ego_features(
        fields, data, point_step, width=width, grid=detector.grid(), channels=detector.cfg.model.feature_channels,
        agent_id=agent_id, stamp_ns=stamp_ns, height=height, row_step=row_step, is_bigendian=is_bigendian)
    if features is None:
        return empty_ego_detections(detector)
    return detector.detect_from_features(features, sensor_height, mc_passes=0)


def empty_ego_detections(detector):
    """What the detector returns for a scan without voxels, for an ego map without cells."""
    from coop_perception.detection.decode import empty_detections
    from coop_perception.detection.voxelize import VoxelStats
    h = detector.cfg.voxel.default_sensor_height
    return empty_detections(detector.cfg, detector.grid(), h, VoxelStats(), {}, 'empty ego map')


def decode_ego_features(fields: Sequence, data, point_step: int, *, width: int, grid, channels: int,
                        agent_id: Hashable, stamp_ns: int, height: int = 1, row_step: int | None = None,
                        is_bigendian: bool = False) -> tuple[np.ndarray | None, float]:
    """A received ``coop/bev`` cloud -> (features (C, H, W) float32 in ``grid``, or None for a map
    without cells; sensor height, m). Raises FeatureMessageError like codec.decode."""
    msg, sensor_height = decode_ego_message(fields, data, point_step, width=width, grid=grid, channels=channels,
                                            agent_id=agent_id, stamp_ns=stamp_ns, height=height, row_step=row_step,
                                            is_bigendian=is_bigendian)
    return ego_features(msg, grid, channels), sensor_height


def decode_ego_message(fields: Sequence, data, point_step: int, *, width: int, grid, channels: int,
                       agent_id: Hashable, stamp_ns: int, height: int = 1, row_step: int | None = None,
                       is_bigendian: bool = False) -> tuple[FeatureMessage, float]:
    """A received ``coop/bev`` cloud -> (its cells as a FeatureMessage, sensor height in m; NaN
    for a map without cells). The message's ROI cells are the ego's detections, whose boxes the
    head gives at their peaks (fusion.roi_boxes) without decoding the whole map. Raises
    FeatureMessageError like codec.decode."""
    row_step = width * point_step if row_step is None else row_step
    msg = decode(fields, data, point_step, width=width, grid=grid, channels=channels,
                 agent_id=agent_id, stamp_ns=stamp_ns, height=height, row_step=row_step,
                 is_bigendian=is_bigendian)
    try:
        dtype = check_layout(fields, height=height, width=width, point_step=point_step,
                             row_step=row_step, data_len=len(data), is_bigendian=is_bigendian,
                             require=(SENSOR_HEIGHT_FIELD,))
    except PointCloudError as e:
        raise FeatureMessageError(FeatureMessageError.MISSING_FIELD, str(e)) from None
    heights = buffer_to_array(data, dtype, height=height, width=width, row_step=row_step)[SENSOR_HEIGHT_FIELD]
    heights = np.asarray(heights, np.float64).reshape(-1)
    if not np.isfinite(heights).all():
        raise FeatureMessageError(FeatureMessageError.NON_FINITE, 'sensor_height holds NaN or infinite values')
    return msg, float(heights[0]) if msg.num_cells else float('nan')


def ego_features(msg: FeatureMessage, grid, channels: int) -> np.ndarray | None:
    """A decoded ego map -> its dense features (C, H, W) float32 in ``grid``; None without cells."""
    if msg.num_cells == 0:
        return None
    H, W = grid.shape
    rows, cols = grid.cells_of(msg.cells[:, 0], msg.cells[:, 1])
    features = np.zeros((channels, H, W), np.float32)
    features[:, rows, cols] = msg.dequantised().T
    return features


def decode_free_range(fields: Sequence, data, point_step: int, *, width: int, bins: int, height: int = 1,
                      row_step: int | None = None, is_bigendian: bool = False) -> np.ndarray | None:
    """The free-range profile (bins,) float32 m of a received ``coop/bev`` cloud, or None when it
    carries none (no ``free_range`` field, fewer cells than bins, all zero). Raises
    FeatureMessageError for non-finite, negative or absurd ranges. Call after
    ``decode_ego_features``, which checks the rest of the layout."""
    if FREE_RANGE_FIELD not in {str(f.name) for f in fields} or height * width < bins:
        return None
    row_step = width * point_step if row_step is None else row_step
    try:
        dtype = check_layout(fields, height=height, width=width, point_step=point_step, row_step=row_step,
                             data_len=len(data), is_bigendian=is_bigendian, require=(FREE_RANGE_FIELD,))
    except PointCloudError as e:
        raise FeatureMessageError(FeatureMessageError.LAYOUT, str(e)) from None
    values = buffer_to_array(data, dtype, height=height, width=width, row_step=row_step)[FREE_RANGE_FIELD]
    free = np.asarray(values, np.float32).reshape(-1)[:bins]
    if not np.isfinite(free).all():
        raise FeatureMessageError(FeatureMessageError.NON_FINITE, 'free_range holds NaN or infinite values')
    if (free < 0).any() or (free > MAX_FREE_RANGE_M).any():
        raise FeatureMessageError(FeatureMessageError.BAD_VALUE, f'free_range outside [0, {MAX_FREE_RANGE_M:g}] m')
    return free.copy() if free.any() else None
