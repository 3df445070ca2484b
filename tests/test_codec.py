from dataclasses import replace

import numpy as np
import pytest

from coop_perception.bev_grid import BevGrid
from coop_perception.data.pointcloud import FLOAT64, INT8, Field, dtype_to_fields
from coop_perception.detection.decode import Detections
from coop_perception.detection.free_range import FREE_RANGE_BINS
from coop_perception.fusion.codec import (MESSAGE_UNCERTAINTY_FIELDS, FeatureMessageError, cell_bytes, decode,
                                          dequantise, encode, make_message, message_dtype, message_uncertainty,
                                          quantise, velocity_std_from_wire, velocity_std_to_wire)
from coop_perception.fusion.sharing import select_occupied_cells, select_roi_cells
from coop_perception.geometry import points_in_boxes

C = 16
# A 32 x 32 grid of 0.8 m cells over +-12.8 m: the detector's cell size on a smaller extent.
GRID = BevGrid(origin=np.array([-12.8, -12.8]), cell_size=0.8, shape=(32, 32))
E = FeatureMessageError


def make_det(boxes, scores, *, features=None, confidence=None, velocities=None, uncertainty=None,
             seed=0, grid=GRID, channels=C) -> Detections:
    rng = np.random.default_rng(seed)
    boxes = np.asarray(boxes, np.float64).reshape(-1, 7)
    n = len(boxes)
    H, W = grid.shape
    if features is None:
        features = np.maximum(rng.normal(size=(channels, H, W)), 0).astype(np.float32)
        features[0] += 0.1  # every cell occupied unless a test clears it
    return Detections(
        boxes=boxes, scores=np.asarray(scores, np.float32), labels=np.zeros(n, np.int64),
        velocities=(rng.normal(size=(n, 2)) if velocities is None else np.asarray(velocities)).astype(np.float32),
        uncertainty=(rng.uniform(0.01, 1, (n, 6)) if uncertainty is None
                     else np.asarray(uncertainty)).astype(np.float32),
        features=features,
        confidence=np.ones((H, W), np.float32) if confidence is None else confidence,
        grid=grid, sensor_height=1.8)


BOXES = np.array([[3.1, 2.3, 0.0, 4.6, 1.9, 1.6, 0.5],
                  [-6.0, -4.2, 0.0, 10.0, 2.5, 3.0, -1.2],
                  [8.0, -8.0, 0.0, 0.7, 0.7, 1.7, 0.0]])
SCORES = [0.9, 0.6, 0.4]


def roi_message(**kw):
    det = make_det(BOXES, SCORES)
    return det, make_message(det, select_roi_cells(det, **kw), agent_id=2, stamp_ns=1_700_000_000_123_456_789)


def decode_(fields, data, step, channels=C, **kw):
    width = len(data) // step if step else 0
    return decode(fields, data, step, width=kw.pop('width', width), grid=GRID, channels=channels,
                  agent_id=2, stamp_ns=5, **kw)


def cell_centres(grid=GRID):
    return grid.centres().reshape(-1, 2)


# ------------------------------------------------------------------ layout, quantisation, round trip
def test_wire_layout_has_one_int8_feature_field():
    assert cell_bytes(64) == 111  # 11 float32 + int16 roi + uint8 v_std_q + 64 int8
    fields, big = dtype_to_fields(message_dtype(64))
    assert not big
    assert [f.name for f in fields] == ['x', 'y', 'scale', 'confidence', *MESSAGE_UNCERTAINTY_FIELDS,
                                        'vx', 'vy', 'score', 'roi', 'v_std_q', 'features']
    assert fields[-1] == Field('features', 47, INT8, 64)


def test_quantise_is_symmetric_per_cell_with_half_step_error():
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(200, C)) * rng.lognormal(0, 2, (200, 1))).astype(np.float32)
    x[5] = 0.0
    q, scale = quantise(x)
    assert q.dtype == np.int8 and scale.dtype == np.float32
    assert scale[5] == 0 and not q[5].any()
    assert np.allclose(scale, np.abs(x).max(1) / 127)
    assert np.abs(q).max(1)[np.arange(200) != 5].min() == 127
    err = np.abs(dequantise(q, scale) - x)
    assert (err <= scale[:, None] * 0.5 * (1 + 1e-5)).all()


def test_round_trip_is_byte_exact_and_features_within_quantisation_error():
    det, msg = roi_message()
    fields, data, step = encode(msg)
    assert step == cell_bytes(C) and len(data) == msg.num_cells * step and msg.num_cells > 20
    out = decode_(fields, data, step)
    for name in ('cells', 'features', 'scale', 'confidence', 'uncertainty', 'velocity', 'roi', 'score',
                 'velocity_std'):
        a, b = getattr(msg, name), getattr(out, name)
        assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True), name
    assert encode(out)[1] == data
    original = det.features[:, ((msg.cells[:, 1] + 12.8) // 0.8).astype(int),
                            ((msg.cells[:, 0] + 12.8) // 0.8).astype(int)].T
    err = out.dequantised() - original
    assert (np.abs(err) <= out.scale[:, None] * 0.5 * (1 + 1e-5)).all()
    assert np.linalg.norm(err) / np.linalg.norm(original) < 0.01


def test_decode_accepts_foreign_field_order_padding_and_big_endian():
    _, msg = roi_message()
    fields, data, _ = encode(msg)
    rec = np.frombuffer(data, message_dtype(C))
    names = list(reversed(rec.dtype.names))  # another order, 4 padding bytes at the end
    offsets, off = [], 0
    for n in names:
        offsets.append(off)
        off += rec.dtype.fields[n][0].itemsize
    big = np.dtype({'names': names, 'offsets': offsets, 'itemsize': off + 4,
                    'formats': [rec.dtype.fields[n][0].newbyteorder('>') for n in names]})
    other = np.zeros(len(rec), big)
    for n in names:
        other[n] = rec[n]
    f2, is_big = dtype_to_fields(big)
    out = decode_(f2, other.tobytes(), big.itemsize, is_bigendian=is_big)
    assert is_big and encode(out)[1] == data


def test_empty_message_and_missing_velocity():
    det = make_det(BOXES, SCORES)
    empty = make_message(det, select_roi_cells(det, score_threshold=0.95), 1, 0)
    fields, data, step = encode(empty)
    assert empty.num_cells == 0 and data == b''
    assert decode_(fields, data, step, width=0).num_cells == 0

    _, msg = roi_message()
    fields, data, step = encode(msg)
    no_v = [f for f in fields if f.name not in ('vx', 'vy', 'v_std_q')]
    out = decode_(no_v, data, step)
    assert not out.velocity.any() and out.velocity_std is None and np.array_equal(out.features, msg.features)


def test_velocity_std_rides_as_a_one_byte_log_code():
    std = np.array([0.0, np.nan, 0.01, 0.27, 1.0, 10.0, 1e3, -1.0])
    q = velocity_std_to_wire(std)
    assert q.dtype == np.uint8 and q[0] == 0 and q[1] == 255 and q[-2] == 254 and q[-1] == 0
    back = velocity_std_from_wire(q)
    assert back[0] == 0 and np.isnan(back[1]) and back[-2] == pytest.approx(14.9, abs=0.1)
    np.testing.assert_allclose(back[2:6], std[2:6], rtol=0.015)        # half a 2.9 % step
    np.testing.assert_array_equal(velocity_std_to_wire(back), q)        # the code is its own fixed point
    det = make_det(BOXES, SCORES)
    det.velocity_std = np.array([0.3, 10.0, np.nan], np.float32)
    msg = make_message(det, select_roi_cells(det), 1, 0)
    fg = msg.roi >= 0
    np.testing.assert_allclose(msg.velocity_std[fg], det.velocity_std[msg.roi[fg]], rtol=0.015)
    assert not msg.velocity_std[~fg].any()
    out = decode_(*encode(msg))
    np.testing.assert_array_equal(out.velocity_std, msg.velocity_std)


# ------------------------------------------------------------------ validation
def _mutated(field, value, rows=slice(None)):
    _, msg = roi_message()
    fields, data, step = encode(msg)
    rec = np.frombuffer(data, message_dtype(C)).copy()
    rec[field][rows] = value
    return fields, rec.tobytes(), step


def _replace_field(name, **changes):
    _, msg = roi_message()
    fields, data, step = encode(msg)
    return [f._replace(**changes) if f.name == name else f for f in fields], data, step


@pytest.mark.parametrize('case,reason,match', [
    ('missing scale', E.MISSING_FIELD, 'scale'),
    ('vx without vy', E.MISSING_FIELD, 'vy'),
    ('feature count', E.CHANNELS, 'count 16.*32 channels'),
    ('x as float64', E.LAYOUT, "'x' has datatype"),
    ('point_step too short', E.LAYOUT, 'does not fit'),
    ('data length', E.LAYOUT, 'data has'),
    ('overlapping fields', E.LAYOUT, 'overlap'),
    ('NaN scale', E.BAD_SCALE, 'NaN'),
    ('negative scale', E.BAD_SCALE, 'negative'),
    ('NaN x', E.NON_FINITE, 'x/y'),
    ('infinite vx', E.NON_FINITE, 'vx/vy'),
    ('confidence above 1', E.BAD_VALUE, 'confidence'),
    ('negative variance', E.BAD_VALUE, 'uncertainty'),
    ('roi below -1', E.BAD_VALUE, 'roi'),
    ('cell outside the grid', E.OUT_OF_GRID, 'outside the 32x32 grid'),
    ('cell between centres', E.OFF_LATTICE, 'not centres'),
    ('duplicate cell', E.DUPLICATE_CELL, 'more than once'),
])
def test_bad_messages_are_rejected_with_a_reason(case, reason, match):
    channels = C
    if case == 'missing scale':
        fields, data, step = encode(roi_message()[1])
        fields = [f for f in fields if f.name != 'scale']
    elif case == 'vx without vy':
        fields, data, step = encode(roi_message()[1])
        fields = [f for f in fields if f.name != 'vy']
    elif case == 'feature count':
        fields, data, step = encode(roi_message()[1])
        channels = 32
    elif case == 'x as float64':
        fields, data, step = _replace_field('x', datatype=FLOAT64)
    elif case == 'point_step too short':
        fields, data, step = encode(roi_message()[1])
        fields, data, step = fields, data[:len(data) // step * (step - 2)], step - 2
    elif case == 'data length':
        fields, data, step = encode(roi_message()[1])
        data = data[:-1]
        with pytest.raises(FeatureMessageError) as info:
            decode_(fields, data, step, width=len(data) // step + 1)
        assert info.value.reason == reason and 'data has' in str(info.value)
        return
    elif case == 'overlapping fields':
        fields, data, step = _replace_field('y', offset=2)
    elif case == 'NaN scale':
        fields, data, step = _mutated('scale', np.nan, 3)
    elif case == 'negative scale':
        fields, data, step = _mutated('scale', -1.0, 3)
    elif case == 'NaN x':
        fields, data, step = _mutated('x', np.nan, 0)
    elif case == 'infinite vx':
        fields, data, step = _mutated('vx', np.inf, 0)
    elif case == 'confidence above 1':
        fields, data, step = _mutated('confidence', 1.5, 0)
    elif case == 'negative variance':
        fields, data, step = _mutated('reg_aleatoric', -0.1, 0)
    elif case == 'roi below -1':
        fields, data, step = _mutated('roi', -2, 0)
    elif case == 'cell outside the grid':
        fields, data, step = _mutated('x', 13.2, 0)  # centre of the first cell past the edge
    elif case == 'cell between centres':
        fields, data, step = _mutated('x', 0.0, 0)   # a cell corner
    elif case == 'duplicate cell':
        _, msg = roi_message()
        fields, data, step = encode(msg)
        rec = np.frombuffer(data, message_dtype(C)).copy()
        rec['x'][1], rec['y'][1] = rec['x'][0], rec['y'][0]
        data = rec.tobytes()
    with pytest.raises(FeatureMessageError, match=match) as info:
        decode_(fields, data, step, channels=channels)
    assert info.value.reason == reason


def test_nan_uncertainty_means_not_estimated_and_passes():
    fields, data, step = _mutated('cls_epistemic', np.nan)
    assert np.isnan(decode_(fields, data, step).uncertainty[:, 1]).all()


# ------------------------------------------------------------------ policies
def _enlarged(boxes, margin):
    out = np.array(boxes, np.float64)
    out[:, 3:5] += 2 * margin
    out[:, 2], out[:, 5] = 0.0, 1e3
    return out


def _peaked_confidence(boxes, grid=GRID):
    """(H, W) confidence with one bump per box, highest in the cell holding its centre."""
    c = grid.centres()
    d2 = ((c[None] - boxes[:, None, None, :2]) ** 2).sum(-1)
    return np.exp(-d2 / 8.0).max(0).astype(np.float32)


def _neighbourhood(flat_cell, grid=GRID):
    r, c = divmod(int(flat_cell), grid.shape[1])
    return {(r + i) * grid.shape[1] + c + j for i in (-1, 0, 1) for j in (-1, 0, 1)}


def test_roi_cells_are_the_enlarged_boxes_plus_the_peak_neighbourhood():
    confidence = _peaked_confidence(BOXES)
    det = make_det(BOXES, SCORES, confidence=confidence)
    margin = 0.4
    sel = select_roi_cells(det, score_threshold=0.0, max_rois=10, margin_m=margin,
                           min_confidence=0.0, max_bytes=None)
    centres = np.column_stack([cell_centres(), np.zeros(32 * 32)])
    inside = points_in_boxes(centres, _enlarged(BOXES, margin))   # (3, H*W)
    peaks = [np.flatnonzero(inside[k])[confidence.reshape(-1)[inside[k]].argmax()] for k in range(3)]
    owner = {c: int(inside[:, c].argmax()) for c in np.flatnonzero(inside.any(0))}
    for k, peak in enumerate(peaks):
        owner.update({c: k for c in _neighbourhood(peak) if c not in owner})
    flat = sel.rows * 32 + sel.cols
    assert flat.tolist() == sorted(owner)
    assert sel.roi.tolist() == [owner[c] for c in flat.tolist()]
    # a rotated 4.6 x 1.9 m car + 0.4 m margins covers (5.4 x 2.7) / 0.64 ~ 23 cells
    assert 18 <= inside[0].sum() <= 28 and (sel.roi == 0).sum() <= inside[0].sum() + 9


def test_peak_neighbourhood_is_sent_below_the_confidence_threshold():
    confidence = _peaked_confidence(BOXES) * 0.12     # only cells near the centres reach 0.1
    det = make_det(BOXES, SCORES, confidence=confidence)
    sel = select_roi_cells(det, score_threshold=0.0, min_confidence=0.1, max_bytes=None)
    flat = set((sel.rows * 32 + sel.cols).tolist())
    assert set(sel.roi) == {0, 1, 2}
    for k in range(3):   # what the receiver relies on (fusion.roi_boxes.roi_peaks)
        mine = np.flatnonzero(sel.roi == k)
        peak = mine[confidence[sel.rows[mine], sel.cols[mine]].argmax()]
        assert _neighbourhood(sel.rows[peak] * 32 + sel.cols[peak]) <= flat
    assert (confidence[sel.rows, sel.cols] < 0.1).any()


def test_overlapping_rois_go_to_the_higher_score():
    boxes = np.array([[0.0, 0.0, 0, 4.0, 2.0, 1.5, 0.0], [1.6, 0.0, 0, 4.0, 2.0, 1.5, 0.0]])
    det = make_det(boxes, [0.5, 0.8], confidence=_peaked_confidence(boxes[1:]))
    sel = select_roi_cells(det, score_threshold=0.0, margin_m=0.0, min_confidence=0.0)
    x, y = GRID.centre_of(sel.rows, sel.cols)
    within = np.abs(y) < 1.0                         # ROI 0's peak neighbourhood reaches beyond
    assert set(sel.roi[within & (x > 0.4)]) == {1}   # the overlap (x in [-0.4, 2]) and beyond
    assert set(sel.roi[x < -0.4]) == {0}
    assert len(np.unique(sel.rows * 32 + sel.cols)) == len(sel.rows)


def test_roi_policy_thresholds_caps_and_skips_empty_cells():
    conf = np.full((32, 32), 0.5, np.float32)
    conf[20:, :] = 0.05                              # y >= 3.2 m: below the confidence threshold
    det = make_det(BOXES, SCORES, confidence=conf)
    det.features[:, :, :8] = 0.0                     # x < -6.4: all-zero features
    sel = select_roi_cells(det, score_threshold=0.5, max_rois=10, margin_m=0.4,
                           min_confidence=0.1, max_bytes=None)
    assert set(sel.roi) == {0, 1}                    # 0.4 is below the score threshold
    assert (conf[sel.rows, sel.cols] >= 0.1).all() and (sel.rows < 20).all()
    assert det.features[:, sel.rows, sel.cols].any(0).all() and (sel.cols >= 8).all()
    unfiltered = select_roi_cells(det, score_threshold=0.5, margin_m=0.4, min_confidence=0.0,
                                  max_bytes=None)
    assert (unfiltered.rows >= 20).any() and len(unfiltered.roi) > len(sel.roi)
    assert set(select_roi_cells(det, score_threshold=0.0, max_rois=1, min_confidence=0.0).roi) == {0}

    full = select_roi_cells(det, score_threshold=0.0, min_confidence=0.0, max_bytes=None)
    n0 = (full.roi == 0).sum()
    budget = (n0 + 1) * cell_bytes(C)                # room for ROI 0 only
    capped = select_roi_cells(det, score_threshold=0.0, min_confidence=0.0, max_bytes=budget)
    assert set(capped.roi) == {0} and len(capped.roi) == n0
    assert len(encode(make_message(det, capped, 0, 0))[1]) <= budget
    # the free-range profile counts against the budget too
    with_profile = replace(det, free_range=np.full(FREE_RANGE_BINS, 20.0, np.float32))
    for budget in (2000, 5000, 20000):
        sel = select_roi_cells(with_profile, score_threshold=0.0, min_confidence=0.0, max_bytes=budget)
        assert len(encode(make_message(with_profile, sel, 0, 0))[1]) <= budget


def test_cells_carry_their_roi_attributes_and_background_is_zero():
    det = make_det(BOXES, SCORES)
    msg = make_message(det, select_occupied_cells(det), 0, 7)
    assert msg.num_cells == 32 * 32
    fg = msg.roi >= 0
    r = msg.roi[fg]
    assert np.array_equal(msg.score[fg], det.scores[r])
    assert np.array_equal(msg.velocity[fg], det.velocities[r])
    assert np.array_equal(msg.uncertainty[fg], message_uncertainty(det.uncertainty, det.boxes)[r])
    assert not msg.score[~fg].any() and not msg.velocity[~fg].any() and not msg.uncertainty[~fg].any()
    assert np.array_equal(msg.roi, select_occupied_cells(det).roi) and set(r) == {0, 1, 2}


def test_occupied_policy_keeps_every_nonzero_cell():
    det = make_det(BOXES, SCORES)
    det.features[:, 3:9, :] = 0.0
    det.features[5, 4, 4] = -0.2                     # one nonzero channel makes a cell occupied
    sel = select_occupied_cells(det)
    occupied = det.features.any(0)
    assert np.array_equal(sel.rows * 32 + sel.cols, np.flatnonzero(occupied))
    centres = np.column_stack([cell_centres(), np.zeros(32 * 32)])
    in_any = points_in_boxes(centres, _enlarged(BOXES, 0.4)).any(0)
    assert np.array_equal(sel.roi >= 0, in_any[occupied.reshape(-1)])


def test_uncertainty_mapping():
    u = np.array([[0.1, 0.2, 0.01, 0.5, 0.3, 0.04], [np.nan, 0, 0, 0, np.nan, np.nan]])
    boxes = np.array([[0, 0, 0, 4.0, 2.0, 1.5, 0.3], [0, 0, 0, 1, 1, 1, 0]])
    out = message_uncertainty(u, boxes)
    assert out.dtype == np.float32 and out.shape == (2, 4)
    # cls_aleatoric, cls_epistemic, reg_aleatoric = x + y + corner radius^2 * yaw, reg_epistemic
    assert np.allclose(out[0], [0.5, 0.3, 0.1 + 0.2 + (16 + 4) / 4 * 0.01, 0.04])
    assert np.isnan(out[1, [1, 2, 3]]).all() and out[1, 0] == 0


@pytest.mark.parametrize('field,value,reason', [
    ('scale', 1e38, E.BAD_SCALE),            # gave NaN boxes and scores before it had a bound
    ('scale', 1e30, E.BAD_SCALE),            # gave boxes hundreds of km away
    ('scale', np.inf, E.BAD_SCALE),
    ('vx', 1e6, E.BAD_VELOCITY),
    ('vy', -101.0, E.BAD_VELOCITY),
    ('reg_aleatoric', 1e30, E.BAD_UNCERTAINTY),
])
def test_physically_impossible_values_are_rejected_with_a_reason(field, value, reason):
    fields, data, step = _mutated(field, value, 0)
    with pytest.raises(FeatureMessageError) as info:
        decode_(fields, data, step)
    assert info.value.reason == reason


def test_values_at_the_physical_bounds_pass():
    from coop_perception.fusion.codec import MAX_SCALE, MAX_SPEED_MPS
    for field, value in (('scale', MAX_SCALE), ('vx', -MAX_SPEED_MPS), ('cls_aleatoric', 1e4)):
        decode_(*_mutated(field, value, 0))


def test_a_point_step_numpy_cannot_hold_is_a_layout_error():
    fields, data, step = encode(roi_message()[1])
    with pytest.raises(FeatureMessageError) as info:
        decode_(fields, data, 2**32 - 1, width=0)
    assert info.value.reason == E.LAYOUT


# ------------------------------------------------------------------ the sender's free-range profile
def test_free_range_profile_rides_as_one_byte_a_bin():
    from coop_perception.detection.free_range import FREE_RANGE_MAX_M, WIRE_STEP_M, to_wire
    from coop_perception.fusion.codec import FREE_RANGE_Q_FIELD, free_range_count

    rng = np.random.default_rng(3)
    free = rng.uniform(1.0, 80.0, FREE_RANGE_BINS).astype(np.float32)
    free[:5] = FREE_RANGE_MAX_M
    det = replace(make_det(BOXES, SCORES), free_range=free)
    msg = make_message(det, select_roi_cells(det), agent_id=2, stamp_ns=7)
    # rounded down to the wire's steps, saturating: never more free space than the sender saw
    assert (msg.free_range <= np.minimum(free, 255 * WIRE_STEP_M) + 1e-6).all()
    assert (msg.free_range > np.minimum(free, 255 * WIRE_STEP_M) - WIRE_STEP_M).all()
    fields, data, step = encode(msg)
    k = free_range_count(FREE_RANGE_BINS, msg.num_cells)
    assert step == cell_bytes(C) + k and len(data) == msg.num_cells * cell_bytes(C) + msg.num_cells * k
    assert [f for f in fields if f.name == FREE_RANGE_Q_FIELD][0].count == k
    out = decode_(fields, data, step)
    np.testing.assert_array_equal(out.free_range, msg.free_range)
    assert encode(out)[1] == data
    # a sensor above the obstacle band says nothing about bins without an obstacle return
    assert (to_wire(free, sensor_height=5.5)[:5] == 0).all() and (to_wire(free, 1.8)[:5] == 255).all()
    # a message from a sender without a profile, or without cells, carries none
    assert decode_(*encode(replace(msg, free_range=None))).free_range is None
    empty = make_message(det, select_roi_cells(det, score_threshold=0.95), 1, 0)
    assert empty.num_cells == 0 and decode_(*encode(empty)).free_range is None


@pytest.mark.parametrize('case', ['too few bytes', 'as float32'])
def test_a_malformed_profile_is_a_layout_error(case):
    from coop_perception.data.pointcloud import FLOAT32
    from coop_perception.detection.free_range import FREE_RANGE_BINS
    from coop_perception.fusion.codec import FREE_RANGE_Q_FIELD

    det = replace(make_det(BOXES, SCORES), free_range=np.full(FREE_RANGE_BINS, 20.0, np.float32))
    fields, data, step = encode(make_message(det, select_roi_cells(det), agent_id=2, stamp_ns=7))
    f = [x for x in fields if x.name == FREE_RANGE_Q_FIELD][0]
    if case == 'too few bytes':
        fields = [x if x is not f else Field(f.name, f.offset, f.datatype, 1) for x in fields]
    else:
        fields = [x if x is not f else Field(f.name, f.offset, FLOAT32, 1) for x in fields]
    with pytest.raises(FeatureMessageError) as info:
        decode_(fields, data, step)
    assert info.value.reason == E.LAYOUT
