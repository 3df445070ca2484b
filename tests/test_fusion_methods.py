"""The fusion-method table: every consumer derives its choices and behaviour from it."""
from pathlib import Path

import numpy as np
import pytest

from coop_perception.cli import main as cli_main
from coop_perception.data.objects import OBJECT_DTYPE
from coop_perception.detection.decode import Detections
from coop_perception.errors import UserError
from coop_perception.fusion.codec import FeatureMessage
from coop_perception.fusion.methods import METHODS, ROS_METHODS, method_named
from coop_perception.fusion.model import FusionModel, load_method_models
from coop_perception.fusion.payloads import BoxList, RawPoints

MODELS = Path(__file__).parents[1] / 'models'


def test_table_rows_are_consistent():
    assert list(METHODS) == ['ego', 'late', 'early', 'max', 'trust', 'gate', 'trust_flat']
    for name, m in METHODS.items():
        assert m.name == name and m.summary
        assert m.payload in (None, FeatureMessage, BoxList, RawPoints)
        if m.payload is not FeatureMessage:   # trust and fusion networks weigh feature cells
            assert m.trust is None and not m.fusion_network and not m.roi_boxes
    assert [m for m in METHODS.values() if not m.delayed] == [METHODS['early']]
    assert ROS_METHODS == ('ego', 'max', 'trust', 'gate', 'trust_flat')
    assert METHODS['trust'].needs_fusion_model and not METHODS['trust'].needs_gate
    assert METHODS['gate'].needs_fusion_model and METHODS['gate'].needs_gate
    assert not any(METHODS[m].needs_fusion_model for m in ('ego', 'late', 'early', 'max'))
    with pytest.raises(ValueError, match='unknown fusion method .*choose from ego, late'):
        method_named('magic')


def test_models_load_only_where_a_method_needs_them(tmp_path):
    missing = tmp_path / 'nothing.pt'
    assert load_method_models([METHODS[m] for m in ('ego', 'late', 'max')], missing, missing) == (None, None)
    with pytest.raises(UserError, match='fusion checkpoint not found'):
        load_method_models([METHODS['trust']], missing, missing)
    fusion, gate = load_method_models([METHODS['gate']], MODELS / 'fusion.pt', MODELS / 'trust_gate.yaml')
    assert isinstance(fusion, FusionModel) and 'thresholds' in gate
    with pytest.raises(UserError, match='trust gate not found'):
        load_method_models([METHODS['gate']], MODELS / 'fusion.pt', missing)
    with pytest.raises(UserError, match='channels'):
        load_method_models([METHODS['trust']], MODELS / 'fusion.pt', missing, channels=3)


def test_payloads_count_their_bytes():
    det = Detections(boxes=np.ones((3, 7)), scores=np.array([0.9, 0.1, 0.5], np.float32),
                     labels=np.zeros(3, np.int64), velocities=np.zeros((3, 2), np.float32),
                     uncertainty=np.zeros((3, 6), np.float32), features=None, confidence=None, grid=None,
                     sensor_height=1.8)
    boxes = BoxList.from_detections(det, 0.3)
    assert len(boxes.boxes) == 2 and boxes.wire_bytes == 2 * OBJECT_DTYPE.itemsize
    assert RawPoints(np.zeros((10, 4), np.float32)).wire_bytes == 160


def test_cli_names_the_methods_it_knows(capsys):
    assert cli_main(['eval', 'fusion', '--data', 'nowhere', '--methods', 'ego,magic']) == 2
    assert 'unknown method(s) magic; choose from ego, late, early, max, trust, gate, trust_flat' in \
        capsys.readouterr().err


def test_a_checkpoint_with_a_foreign_box_trust_is_a_user_error(tmp_path):
    import torch

    ckpt = torch.load(MODELS / 'fusion.pt', map_location='cpu', weights_only=False)
    ckpt['box_trust'] = {**ckpt['box_trust'], 'features': ['score']}
    torch.save(ckpt, tmp_path / 'fusion.pt')
    with pytest.raises(UserError, match='box trust unreadable'):
        load_method_models([METHODS['trust']], tmp_path / 'fusion.pt', tmp_path / 'none.yaml')
    assert FusionModel.load(MODELS / 'fusion.pt').box_trust is not None   # the shipped one carries it


def test_a_checkpoint_whose_trust_takes_other_attributes_is_a_user_error(tmp_path):
    import torch

    ckpt = torch.load(MODELS / 'fusion.pt', map_location='cpu', weights_only=False)
    ckpt['state']['trust.net.0.weight'] = ckpt['state']['trust.net.0.weight'][:, :-1]
    torch.save(ckpt, tmp_path / 'fusion.pt')
    with pytest.raises(UserError, match='train it again'):
        FusionModel.load(tmp_path / 'fusion.pt')
