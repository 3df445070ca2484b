"""Checkpoints: weights plus the config they were trained with, checked against the YAML on load."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from coop_perception.errors import UserError

from .config import ARCHITECTURE_SECTIONS, DetectorConfig, config_diff, load_config
from .model import Detector

log = logging.getLogger(__name__)
FORMAT = 1


def save_checkpoint(path: str | Path, model: Detector, **extra: Any) -> None:
    """Atomically write weights, config and ``extra`` (optimizer state, iteration, ...)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + '.tmp')
    torch.save({'format': FORMAT, 'config': model.cfg.to_dict(), 'model': model.state_dict(), **extra}, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except (OSError, RuntimeError, EOFError) as e:
        raise UserError(path, f'cannot read checkpoint: {e}') from e
    if not isinstance(ckpt, dict) or ckpt.get('format') != FORMAT:
        raise UserError(path, f'not a detector checkpoint (format {FORMAT})')
    return ckpt


def check_config(ckpt_config: dict[str, Any], cfg: DetectorConfig, ckpt_path: str | Path,
                 cfg_source: str) -> None:
    """Raise if the architecture sections differ; log the other differences (the YAML wins)."""
    yaml_dict = cfg.to_dict()
    # Through the dataclasses, so that keys added later with their default compare equal.
    ckpt_config = DetectorConfig.from_dict(ckpt_config, str(ckpt_path), defaults_ok=True).to_dict()
    arch = config_diff({k: ckpt_config.get(k) for k in ARCHITECTURE_SECTIONS},
                       {k: yaml_dict[k] for k in ARCHITECTURE_SECTIONS})
    if arch:
        raise UserError(ckpt_path, f'checkpoint does not match {cfg_source} (checkpoint vs config):\n  '
                        + '\n  '.join(arch))
    rest = config_diff({k: v for k, v in ckpt_config.items() if k not in ARCHITECTURE_SECTIONS},
                       {k: v for k, v in yaml_dict.items() if k not in ARCHITECTURE_SECTIONS})
    if rest:
        log.info('%s: using %s for settings that differ from training (checkpoint vs config): %s',
                 ckpt_path, cfg_source, '; '.join(rest))


def load_detector(path: str | Path, config: str | Path | DetectorConfig | None = None) -> Detector:
    """Detector in eval mode from a checkpoint. ``config`` (a YAML path or a config) must agree
    with the checkpoint's architecture; without it the checkpoint's own config is used."""
    ckpt = read_checkpoint(path)
    if config is None:
        cfg = DetectorConfig.from_dict(ckpt['config'], f'{path} (stored config)', defaults_ok=True)
    else:
        cfg = config if isinstance(config, DetectorConfig) else load_config(config)
        check_config(ckpt['config'], cfg, path, 'the given config' if isinstance(config, DetectorConfig)
                     else str(config))
    model = Detector(cfg)
    try:
        model.load_state_dict(ckpt['model'])
    except RuntimeError as e:
        raise UserError(path, f'weights do not fit the model: {e}') from e
    return model.eval()
