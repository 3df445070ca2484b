"""AP on hand-computed cases (OpenCOOD convention: greedy matching, whole-split sorting, VOC)."""
import numpy as np
import pytest

from coop_perception.eval.ap import APAccumulator, auroc, match_frame, voc_ap

CLASSES = ('car', 'truck', 'pedestrian', 'cyclist')


def box(x=0.0, y=0.0, l=4.0, w=2.0, yaw=0.0):
    return [x, y, 0.0, l, w, 1.5, yaw]


def acc(**kw):
    return APAccumulator(CLASSES, **kw)


def test_voc_all_point_interpolation():
    # recall .5 at precision 1, then recall 1 at precision 2/3: 0.5 * 1 + 0.5 * 2/3
    assert voc_ap(np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3])) == pytest.approx(5 / 6)
    assert voc_ap(np.array([]), np.array([])) == 0.0


def test_perfect_detection_and_missing_class():
    a = acc()
    a.add_frame([box()], [0.9], [0], [box()], [0])
    ap = a.ap()
    assert ap['car'] == {0.3: 1.0, 0.5: 1.0, 0.7: 1.0}
    assert ap['truck'][0.5] is None  # no ground truth: undefined, not 0
    s = a.summary()
    assert s['ap']['car']['0.5'] == 1.0 and s['mean']['0.7'] == 1.0 and s['frames'] == 1


def test_false_positive_between_true_positives():
    a = acc()
    a.add_frame([box(), box(20), box(10)], [0.9, 0.8, 0.7], [0, 0, 0], [box(), box(10)], [0, 0])
    assert a.ap()['car'][0.5] == pytest.approx(5 / 6)


def test_iou_thresholds():
    # 4 x 2 box shifted 1 m along its length: IoU = 3 / 5 = 0.6
    a = acc()
    a.add_frame([box(1.0)], [0.9], [0], [box()], [0])
    assert a.ap()['car'] == {0.3: 1.0, 0.5: 1.0, 0.7: 0.0}


def test_rotated_iou_is_used():
    # same centre, turned 90 degrees: overlap 2 x 2 = 4, union 8 + 8 - 4 = 12, IoU 1/3
    a = acc()
    a.add_frame([box(yaw=np.pi / 2)], [0.9], [0], [box()], [0])
    assert a.ap()['car'] == {0.3: 1.0, 0.5: 0.0, 0.7: 0.0}


def test_sorting_over_the_whole_split_not_per_frame():
    a = acc()
    a.add_frame([box()], [0.6], [0], [box()], [0])                              # TP 0.6
    a.add_frame([box(30), box(50)], [0.9, 0.5], [0, 0], [box(50)], [0])        # FP 0.9, TP 0.5
    # sorted 0.9 FP, 0.6 TP, 0.5 TP over 2 GT: precision envelope 2/3 over all recall
    assert a.ap()['car'][0.5] == pytest.approx(2 / 3)  # per-frame averaging would give 0.75


def test_greedy_matching_in_score_order():
    # the higher-scored but worse detection (IoU 0.6) takes the box first
    a = acc()
    a.add_frame([box(1.0), box()], [0.9, 0.8], [0, 0], [box()], [0])
    ap = a.ap()['car']
    assert ap[0.5] == 1.0  # 0.9 TP, 0.8 duplicate FP after full recall
    assert ap[0.7] == pytest.approx(0.5)  # 0.9 FP (IoU 0.6), 0.8 TP: precision 1/2 at recall 1


def test_match_frame_takes_best_remaining_box():
    gts = np.array([box(), box(1.5)])
    # both detections overlap box 0 best; the second falls back to the remaining box 1
    m = match_frame(np.array([box(0.2), box(0.7)]), np.array([0.9, 0.8]), gts, 0.3)
    assert m.tolist() == [0, 1]


def test_classes_are_separate():
    a = acc()
    a.add_frame([box()], [0.9], [1], [box()], [0])  # a truck detection on a car
    ap = a.ap()
    assert ap['car'][0.3] == 0.0 and ap['truck'][0.3] is None


def test_range_limit_applies_to_detections_and_ground_truth():
    a = acc(max_range=50.0)
    a.add_frame([box(), box(60)], [0.9, 0.95], [0, 0], [box(), box(70)], [0, 0])
    assert a.ap()['car'][0.5] == 1.0
    assert a.gt_counts()['car'] == 1
    assert len(a.detections()['scores']) == 1


def test_ignored_labels_and_empty_frames():
    a = acc()
    a.add_frame(np.zeros((0, 7)), [], [], [box()], [-1])  # unknown class: not counted
    a.add_frame(np.zeros((0, 7)), [], [], [box()], [0])  # missed car
    assert a.gt_counts()['car'] == 1 and a.ap()['car'][0.3] == 0.0


def test_detections_keep_extra_and_matched_ground_truth():
    a = acc()
    a.add_frame([box(1.0), box(30)], [0.9, 0.8], [0, 0], [box()], [0],
                extra={'unc': np.array([0.1, 0.7])})
    d = a.detections()
    assert d['tp'].tolist() == [[True, True, False], [False, False, False]]
    assert np.allclose(d['matched_gt'][0, 0], box()) and np.isnan(d['matched_gt'][0, 2]).all()
    assert d['unc'].tolist() == [0.1, 0.7]


def test_auroc():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auroc([1, 1, 1], [0, 1, 1]) == pytest.approx(0.5)  # ties count half
    assert auroc([0.2], [1]) is None


def test_false_positives_per_scan_count_confident_unmatched_detections():
    from coop_perception.eval.detector_eval import false_positives_per_scan

    acc = APAccumulator(('car', 'pedestrian'), (0.3, 0.5, 0.7))
    car = np.array([10.0, 0, 0, 4.5, 2.0, 1.5, 0])
    far = car + np.array([20.0, 0, 0, 0, 0, 0, 0])
    # on the car, a duplicate of it, a confident box on nothing, a faint one on nothing, a pedestrian
    # labelled box on the car (wrong class)
    boxes = np.stack([car, car, far, far + [0, 5, 0, 0, 0, 0, 0], car])
    acc.add_frame(boxes, np.array([0.9, 0.6, 0.5, 0.2, 0.4]), np.array([0, 0, 0, 0, 1]),
                  car[None], np.array([0]))
    acc.add_frame(np.zeros((0, 7)), np.zeros(0), np.zeros(0), np.zeros((0, 7)), np.zeros(0))
    fp = false_positives_per_scan(acc.detections(), 1, acc.classes, acc.frames)
    assert fp == {'car': 1.0, 'pedestrian': 0.5, 'all': 1.5}


def test_false_positives_split_by_what_they_overlap():
    from coop_perception.eval.detector_eval import false_positive_kinds, nearest_ground_truth

    acc = APAccumulator(('car', 'truck'), (0.3, 0.5, 0.7))
    car = np.array([10.0, 0, 0, 4.5, 2.0, 1.5, 0])
    truck = np.array([0.0, 10, 0, 6.0, 2.5, 3.0, 0])
    gt, gt_labels = np.stack([car, truck]), np.array([0, 1])
    # the car found, a duplicate of it (loose), a car box 2.5 m off it (loose), a car box on the truck
    # (other class), a car box on nothing, a faint car box on nothing (not counted)
    boxes = np.stack([car, car, car + [2.5, 0, 0, 0, 0, 0, 0], truck + [0, 0, 0, -1.5, -0.5, 0, 0],
                      car + [20, 0, 0, 0, 0, 0, 0], car + [0, 20, 0, 0, 0, 0, 0]])
    labels, scores = np.zeros(6, np.int64), np.array([0.9, 0.6, 0.5, 0.5, 0.5, 0.2])
    near = nearest_ground_truth(boxes, labels, gt, gt_labels)
    assert near['iou_same_class'][0] == pytest.approx(1.0) and near['iou_other_class'][0] == 0.0
    assert 0.1 < near['iou_same_class'][2] < 0.5 and near['iou_other_class'][3] > 0.0
    acc.add_frame(boxes, scores, labels, gt, gt_labels, extra=near)
    acc.add_frame(np.zeros((0, 7)), np.zeros(0), np.zeros(0), np.zeros((0, 7)), np.zeros(0),
                  extra=nearest_ground_truth(np.zeros((0, 7)), np.zeros(0), np.zeros((0, 7)), np.zeros(0)))
    kinds = false_positive_kinds(acc.detections(), 1, acc.classes, acc.frames)
    assert kinds['car'] == {'loose': 1.0, 'other_class': 0.5, 'nothing_there': 0.5}   # per scan of 2
    assert kinds['truck'] == {'loose': 0.0, 'other_class': 0.0, 'nothing_there': 0.0}
    assert kinds['all'] == kinds['car']
