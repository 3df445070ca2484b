"""Commands of the fusion: ``train fusion``; and what fusion commands load from their options (the
feature cache of ``--cache``, the models of ``--fusion`` / ``--gate``)."""
from __future__ import annotations

from pathlib import Path

from coop_perception.commands import MODELS, Commands, add_cache_arg, add_detector_args, add_run_folder_args
from coop_perception.data.commands import add_dataset_args
from coop_perception.errors import UserError


def add_cli(commands: Commands) -> None:
    p = commands.add('fusion', cmd_train_fusion, 'train the trust fusion on cached detector features (resumable)',
                     group='train')
    add_dataset_args(p, 'the train preset')
    add_cache_arg(p)
    add_run_folder_args(p, "override the fusion config's iterations")
    p.add_argument('--fusion-config', default=str(MODELS / 'fusion.yaml'),
                   help='fusion training settings YAML (default: those the shipped fusion.pt was trained with)')
    p.add_argument('--box-trust', default=str(MODELS / 'fusion.pt'), metavar='CHECKPOINT',
                   help='a fusion checkpoint whose calibrated box trust (`calibrate box-trust`, which depends '
                        'on the detector only) weights the cells during training and ships with the new '
                        'weights (default: the shipped one)')
    add_detector_args(p)


def feature_cache_from_args(args, detector, dataset):
    """The feature cache of ``--cache`` (default DATA/feature_cache) for ``detector`` (``--weights``),
    views not cached yet computed now."""
    from .cache import feature_cache

    cache, written = feature_cache(dataset, detector, args.weights, args.cache or Path(args.data) / 'feature_cache')
    if written:
        print(f'cached {written} new agent views in {cache.root}')
    return cache


def fusion_models_from_args(args, detector, methods: list[str]) -> tuple:
    """The fusion checkpoint (``--fusion``) and calibrated gate (``--gate``) that ``methods`` need
    (else None)."""
    from .methods import METHODS
    from .model import load_method_models

    fusion, gate = load_method_models([METHODS[m] for m in methods], args.fusion, args.gate,
                                      channels=detector.cfg.model.feature_channels)
    return (fusion.to(detector.device) if fusion is not None else None), gate


def box_trust_from(path):
    """The calibrated box trust stored in the fusion checkpoint ``path``; a UserError when the
    file is missing, unreadable or carries none."""
    from coop_perception.commands import reading, require_checkpoint

    from .model import FusionModel

    require_checkpoint(path, 'box trust checkpoint', ' (calibrate one with `calibrate box-trust`)')
    with reading(path, 'box trust checkpoint'):
        box_trust = FusionModel.load(path).box_trust
    if box_trust is None:
        raise UserError(path, 'carries no box trust; calibrate one with `calibrate box-trust`')
    return box_trust


def cmd_train_fusion(args) -> int:
    from dataclasses import replace

    from coop_perception.data.commands import dataset_from_args
    from coop_perception.detection.commands import detector_from_args
    from coop_perception.torch_device import resolve_device

    from .train import FusionExamples, load_fusion_config, train_fusion

    cfg = load_fusion_config(args.fusion_config)
    box_trust = box_trust_from(args.box_trust)
    if args.iterations:
        cfg = replace(cfg, iterations=args.iterations)
    model = detector_from_args(args)
    ds = dataset_from_args(args)
    examples = FusionExamples(ds, feature_cache_from_args(args, model, ds))
    print(f'training fusion on {len(examples)} ego frames -> {args.out}')
    path = train_fusion(model, examples, args.out, cfg, resume=not args.restart, box_trust=box_trust,
                        device=resolve_device(args.device))
    print(f'wrote {path}')
    return 0
