"""models/fusion.yaml: the fusion's training settings, parsed as strictly as the detector's config,
equal to what the shipped models/fusion.pt records, and what `train fusion` trains with."""
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from coop_perception import cli
from coop_perception.detection import commands as detection_commands
from coop_perception.errors import UserError
from coop_perception.fusion import commands as fusion_commands
from coop_perception.fusion import train as fusion_train
from coop_perception.fusion.model import FusionModel
from coop_perception.fusion.train import FusionTrainConfig, load_fusion_config

MODELS = Path(__file__).resolve().parents[1] / 'models'
SHIPPED = MODELS / 'fusion.yaml'


def test_shipped_config_is_what_the_shipped_weights_were_trained_with():
    cfg = load_fusion_config(SHIPPED)
    assert isinstance(cfg, FusionTrainConfig)
    assert cfg.iterations == 1000                     # "Ship trust fusion weights (1000 it ...)"
    ckpt = torch.load(MODELS / 'fusion.pt', map_location='cpu', weights_only=False)
    assert vars(cfg) == ckpt['train_config']          # every setting, as train_fusion stored it
    assert cfg.scales == ckpt['config']['scales']     # the architecture the weights have


def _write(tmp_path, old: str, new: str) -> Path:
    text = SHIPPED.read_text()
    assert text.count(old) == 1, old
    path = tmp_path / 'fusion.yaml'
    path.write_text(text.replace(old, new))
    return path


@pytest.mark.parametrize('old, new, match', [
    ('seed: 0', 'seed: 0\nwarmup: 100', r"unknown keys \['warmup'\]"),                      # unknown key
    ('iterations: 1000', 'iteration: 1000', r"unknown keys \['iteration'\], missing keys \['iterations'\]"),
    ('slots: 4', '', r"missing keys \['slots'\]"),
    ('lr: 0.001', 'lr: 1e-3', r"lr: expected float, got '1e-3'"),       # YAML 1.1 reads 1e-3 as a string
    ('iterations: 1000', 'iterations: 1000.0', r'iterations: expected int, got 1000\.0'),
    ('batch_size: 2', 'batch_size: true', r'batch_size: expected int, got True'),
    ('max_latency_ms: 600.0', 'max_latency_ms: [0, 600]', r'max_latency_ms: expected float, got \[0, 600\]'),
    ('loss_probability: 0.1', 'loss_probability: 1.5', r'loss_probability in \[0, 1\)'),
    ('slots: 4', 'slots: 0', r'slots must be >= 1, got 0'),
])
def test_config_rejects_unknown_missing_and_mistyped_keys(tmp_path, old, new, match):
    path = _write(tmp_path, old, new)
    with pytest.raises(UserError, match=match) as e:
        load_fusion_config(path)
    assert e.value.path == str(path)                  # the message names the file


def test_config_must_be_a_readable_mapping(tmp_path):
    with pytest.raises(UserError, match='cannot read fusion config'):
        load_fusion_config(tmp_path / 'missing.yaml')
    (tmp_path / 'list.yaml').write_text('- 1\n')
    with pytest.raises(UserError, match='fusion config must be a mapping'):
        load_fusion_config(tmp_path / 'list.yaml')


def test_an_int_fits_a_float_setting(tmp_path):
    cfg = load_fusion_config(_write(tmp_path, 'max_latency_ms: 600.0', 'max_latency_ms: 600'))
    assert cfg.max_latency_ms == 600


def test_train_fusion_cli_trains_with_the_config_and_overrides_iterations(tmp_path, monkeypatch):
    parser = cli.build_parser()
    args = parser.parse_args(['train', 'fusion', '--data', str(tmp_path), '--out', str(tmp_path / 'run')])
    assert Path(args.fusion_config) == SHIPPED and args.iterations is None

    seen = {}

    def train_fusion(model, examples, out, cfg, resume, box_trust, device):
        seen['cfg'], seen['box_trust'], seen['device'] = cfg, box_trust, device
        return Path(out) / 'fusion.pt'

    # everything but the settings is stubbed: no detector, data or training
    monkeypatch.setattr(detection_commands, 'detector_from_args', lambda args: 'detector')
    monkeypatch.setattr(fusion_commands, 'feature_cache_from_args', lambda args, model, ds: 'cache')
    monkeypatch.setattr('coop_perception.data.v2xsim.V2XSimDataset', lambda *a, **kw: 'dataset')
    monkeypatch.setattr(fusion_train, 'FusionExamples', lambda ds, cache: [])
    monkeypatch.setattr(fusion_train, 'train_fusion', train_fusion)
    custom = _write(tmp_path, 'seed: 0', 'seed: 5')
    argv = ['train', 'fusion', '--data', str(tmp_path), '--out', str(tmp_path / 'run'), '--fusion-config', str(custom)]
    assert cli.main(argv + ['--iterations', '3']) == 0
    assert seen['cfg'] == FusionTrainConfig(**{**vars(load_fusion_config(SHIPPED)), 'seed': 5, 'iterations': 3})
    # by default the shipped checkpoint's calibrated box trust weights the cells while training
    assert seen['box_trust'] == FusionModel.load(SHIPPED.with_suffix('.pt')).box_trust is not None
    assert str(seen['device']) == 'cpu'                 # --device's default

    seen.clear()
    assert cli.main(argv) == 0
    assert seen['cfg'].iterations == 1000 and seen['cfg'].seed == 5


def test_train_fusion_cli_rejects_a_bad_config_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(detection_commands, 'detector_from_args', lambda args: pytest.fail('loaded the detector first'))
    bad = _write(tmp_path, 'seed: 0', 'seed: 0\nsed: 1')
    assert cli.main(['train', 'fusion', '--data', str(tmp_path), '--out', str(tmp_path / 'run'),
                     '--fusion-config', str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "unknown keys ['sed']" in err


def test_train_fusion_cli_needs_a_box_trust(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(detection_commands, 'detector_from_args', lambda args: pytest.fail('loaded the detector first'))
    bare = tmp_path / 'bare.pt'
    FusionModel(8).save(bare)
    assert cli.main(['train', 'fusion', '--data', str(tmp_path), '--out', str(tmp_path / 'run'),
                     '--box-trust', str(bare)]) == 2
    assert f'{bare}: carries no box trust' in capsys.readouterr().err


def test_every_setting_is_in_the_shipped_file():
    keys = [line.split(':')[0] for line in SHIPPED.read_text().splitlines() if line and not line.startswith('#')]
    assert keys == [f.name for f in fields(FusionTrainConfig)]
