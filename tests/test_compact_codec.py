"""The compact (one-packet) layout: one fixed-point record per ROI, within 1,398 bytes."""
from dataclasses import replace

import numpy as np
import pytest
from test_codec import GRID, make_det

from coop_perception.data.pointcloud import FLOAT32, Field
from coop_perception.detection.free_range import FREE_RANGE_BINS
from coop_perception.fusion.codec import FeatureMessageError, decode, encode
from coop_perception.fusion.compact_codec import (CELL_FIELD, RECORD_BYTES, uncertainty_from_wire,
                                                  uncertainty_to_wire)
from coop_perception.fusion.pipeline import collaborator_message
from coop_perception.fusion.roi_boxes import decode_roi_boxes
from coop_perception.fusion.sharing import COMPACT_MAX_BYTES, select_roi_peaks

C = 16
E = FeatureMessageError
COMPACT = {'format': 'compact'}


def _boxes(n, seed=0):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(-11, 11, (n, 2))
    size = np.column_stack([rng.uniform(3.5, 5, n), rng.uniform(1.6, 2.1, n), rng.uniform(1.4, 1.8, n)])
    return np.column_stack([xy, rng.uniform(-1.2, -0.8, n), size, rng.uniform(-np.pi, np.pi, n)])


def _det(n=6, seed=0, profile=False):
    boxes = _boxes(n, seed)
    scores = np.linspace(0.95, 0.35, n)
    rng = np.random.default_rng(seed)
    det = make_det(boxes, scores, seed=seed, confidence=rng.uniform(0.1, 1, GRID.shape).astype(np.float32))
    if profile:
        det = replace(det, free_range=np.full(FREE_RANGE_BINS, 20.0, np.float32))
    return replace(det, velocity_std=np.linspace(0.05, 12.0, n).astype(np.float32))


def _decode(fields, data, step, **kw):
    width = kw.pop('width', len(data) // step if step else 0)
    return decode(fields, data, step, width=width, grid=GRID, channels=C, agent_id=3, stamp_ns=7, **kw)


def test_round_trip_keeps_the_senders_boxes_to_a_centimetre():
    det = _det()
    msg = collaborator_message(det, 3, 7, COMPACT)
    fields, data, step = encode(msg)
    assert step == RECORD_BYTES == 28 and len(data) == msg.num_cells * RECORD_BYTES
    back = _decode(fields, data, step, num_classes=4)
    assert encode(back)[1] == data                     # what the receiver holds re-encodes exactly
    rois = np.asarray(select_roi_peaks(det).roi)
    assert list(rois) == sorted(rois, key=lambda i: -det.scores[i])     # best first
    sent = det.boxes[rois]
    assert np.abs(back.boxes[:, :2] - sent[:, :2]).max() <= 0.005 + 1e-6
    assert np.abs(back.boxes[:, 2] - (sent[:, 2] + det.sensor_height)).max() <= 0.005 + 1e-6
    assert np.abs(back.boxes[:, 3:6] - sent[:, 3:6]).max() <= 0.005 + 1e-6
    yaw_err = (back.boxes[:, 6] - sent[:, 6] + np.pi) % (2 * np.pi) - np.pi
    assert np.abs(yaw_err).max() < 1e-4
    assert np.abs(back.score - det.scores[rois]).max() <= 0.5 / 255 + 1e-6
    assert np.abs(back.velocity - det.velocities[rois]).max() <= 0.005 + 1e-6
    assert np.allclose(back.velocity_std, det.velocity_std[rois], rtol=0.03)
    assert (back.labels == det.labels[rois]).all() and (back.roi == np.arange(len(rois))).all()
    assert not back.features.any()                     # no feature channels in this layout


def test_uncertainty_codes_hold_decades_to_nine_percent():
    u = np.array([0.0, 1e-6, 3e-4, 0.02, 0.7, 4.5, 900.0, np.nan])
    back = uncertainty_from_wire(uncertainty_to_wire(u))
    assert back[0] == 0 and np.isnan(back[-1])
    assert np.allclose(back[1:-1], u[1:-1], rtol=0.045)


def test_rois_fit_one_packet_with_the_free_range_profile_in_score_order():
    det = _det(n=60, seed=1, profile=True)
    msg = collaborator_message(det, 3, 7, COMPACT)
    fields, data, step = encode(msg)
    assert len(data) <= COMPACT_MAX_BYTES
    back = _decode(fields, data, step)
    assert np.allclose(back.free_range, 20.0, atol=0.5)
    sel = select_roi_peaks(det)
    assert len(sel.roi) == msg.num_cells and (np.diff(det.scores[sel.roi]) <= 0).all()
    assert len(np.unique(det.grid.flat_index(sel.rows, sel.cols))) == len(sel.roi)
    tight = select_roi_peaks(det, max_bytes=900)          # the best ROIs that fit
    assert len(tight.roi) == (900 - FREE_RANGE_BINS) // (RECORD_BYTES + 1) < len(sel.roi)
    assert (tight.roi == sel.roi[:len(tight.roi)]).all()


def test_receiver_takes_the_compact_boxes_as_sent():
    det = _det()
    msg = _decode(*encode(collaborator_message(det, 3, 7, COMPACT)))
    I = np.eye(4)
    rb = decode_roi_boxes(None, msg, I, I, msg.stamp_ns, 1.8)   # no head needed
    assert np.allclose(rb.boxes, msg.boxes - [0, 0, 1.8, 0, 0, 0, 0], atol=1e-5)
    assert np.allclose(rb.scores, msg.score) and (rb.labels == msg.labels).all()


def _records(det=None):
    fields, data, step = encode(collaborator_message(det or _det(), 3, 7, COMPACT))
    dtype = np.dtype({'names': [f.name for f in fields], 'formats': [_fmt(f) for f in fields],
                      'offsets': [f.offset for f in fields], 'itemsize': step})
    return fields, np.frombuffer(data, dtype).copy(), step


def _fmt(f):
    base = {1: 'i1', 2: 'u1', 3: '<i2', 4: '<u2'}[f.datatype]
    return base if f.count <= 1 else (base, (f.count,))


@pytest.mark.parametrize('corrupt, reason', [
    (lambda r: r.__setitem__(CELL_FIELD, 40_000), E.OUT_OF_GRID),
    (lambda r: r.__setitem__('l', 0), E.BAD_VALUE),
    (lambda r: r.__setitem__('label', 9), E.BAD_VALUE),
    (lambda r: r.__setitem__('vx', 30_000), E.BAD_VELOCITY),
    (lambda r: r.__setitem__(CELL_FIELD, r[CELL_FIELD][0]), E.DUPLICATE_CELL),
])
def test_absurd_records_are_rejected_with_a_reason(corrupt, reason):
    fields, rec, step = _records()
    corrupt(rec)
    with pytest.raises(E) as info:
        _decode(fields, rec.tobytes(), step, num_classes=4)
    assert info.value.reason == reason


def test_truncated_or_mistyped_payloads_are_rejected_with_a_reason():
    fields, data, step = encode(collaborator_message(_det(), 3, 7, COMPACT))
    width = len(data) // step
    with pytest.raises(E) as info:
        _decode(fields, data[:-5], step, width=width)
    assert info.value.reason == E.LAYOUT
    wrong = [Field(f.name, f.offset, FLOAT32, f.count) if f.name == 'score' else f for f in fields]
    with pytest.raises(E) as info:
        _decode(wrong, data, step)
    assert info.value.reason == E.LAYOUT
    with pytest.raises(E) as info:
        _decode([f for f in fields if f.name != 'yaw'], data, step)
    assert info.value.reason == E.MISSING_FIELD


def test_an_empty_scan_sends_an_empty_message():
    det = _det(n=0)
    msg = collaborator_message(det, 3, 7, COMPACT)
    fields, data, step = encode(msg)
    assert data == b'' and _decode(fields, data, step).num_cells == 0


def test_unknown_sharing_format_is_refused():
    with pytest.raises(ValueError, match='sharing format'):
        collaborator_message(_det(), 3, 7, {'format': 'zip'})
