"""Detector training: seeded, resumable, on any indexable collection of sensor-frame examples.

Everything random is a pure function of (seed, iteration) or (seed, epoch) except dropout, whose
torch RNG state is checkpointed; a resumed run therefore continues exactly where it stopped.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
from tqdm import tqdm

from .augment import augment_scene
from .checkpoint import check_config, read_checkpoint, save_checkpoint
from .config import DetectorConfig, TrainConfig
from .gt_database import GroundTruthDatabase, build_database, paste_objects
from .model import Detector
from .targets import Targets, batch_targets, detection_loss, example_targets
from .voxelize import resolve_sensor_height, voxelize

log = logging.getLogger(__name__)
CHECKPOINT = 'checkpoint.pt'  # latest full training state, overwritten
FINAL = 'detector.pt'  # weights + config only, what gets shipped
LOG = 'train_log.jsonl'
GT_DATABASE = 'gt_database.npz'  # objects pasted by ground-truth sampling, built once per run
_LR_FLOOR = 0.01  # cosine decay ends at this fraction of the peak learning rate


class TrainExample(NamedTuple):
    points: np.ndarray  # (N, 3+) float32, sensor frame
    boxes: np.ndarray  # (M, 7) sensor frame
    labels: np.ndarray  # (M,) int indices into CLASSES, -1 = ignore
    velocities: np.ndarray  # (M, 2) m/s along the sensor axes
    sensor_height: float | None = None  # m above ground; None: resolved as at inference
    ages: np.ndarray | None = None  # (N,) s before the newest sweep (detection.sweeps); None: one sweep


@dataclass
class Batch:
    coords: torch.Tensor  # (V, 4) int32 [batch, z, y, x]
    features: torch.Tensor  # (V, F)
    size: int
    targets: Targets


@dataclass
class TrainSummary:
    iterations: int
    final_losses: dict[str, float]
    checkpoint: Path
    weights: Path


def prepare_batch(examples: Sequence, cfg: DetectorConfig, rng: np.random.Generator | None,
                  database: GroundTruthDatabase | None = None) -> Batch:
    """Voxelise and build targets for a list of examples; ``rng`` None disables augmentation,
    ``database`` (with ``train.augment.gt_sampling``) pastes objects from other scans."""
    coords, feats, per_example = [], [], []
    for b, ex in enumerate(examples):
        ex = TrainExample(*ex)
        pts, ages = ex.points, ex.ages
        if ages is not None and rng is not None and rng.random() < cfg.train.augment.single_sweep:
            pts, ages = pts[ages == 0], ages[ages == 0]
        h = resolve_sensor_height(pts if ages is None else pts[ages == 0], cfg.voxel, ex.sensor_height)
        boxes, labels, vel = ex.boxes, ex.labels, ex.velocities
        if rng is not None and database is not None:
            pts, ages, boxes, labels, vel = paste_objects(pts, ages, boxes, labels, vel, h, database,
                                                          cfg.train.augment.gt_sampling, rng)
        if rng is not None:
            pts, boxes, vel, h = augment_scene(pts, boxes, vel, h, cfg.train.augment, rng)
        vox = voxelize(pts, cfg.voxel, h, ages)
        coords.append(np.pad(vox.coords, ((0, 0), (1, 0)), constant_values=b))
        feats.append(vox.features)
        per_example.append(example_targets(boxes, labels, vel, h, cfg))
    return Batch(torch.from_numpy(np.concatenate(coords)), torch.from_numpy(np.concatenate(feats)),
                 len(per_example), batch_targets(per_example, cfg))


def lr_at(it: int, tc: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to _LR_FLOOR of the peak at ``tc.iterations``."""
    if it < tc.warmup_iterations:
        return tc.lr * (0.1 + 0.9 * it / max(1, tc.warmup_iterations))
    span = max(1, tc.iterations - tc.warmup_iterations)
    progress = min(1.0, (it - tc.warmup_iterations) / span)
    return tc.lr * (_LR_FLOOR + (1 - _LR_FLOOR) * 0.5 * (1 + math.cos(math.pi * progress)))


def batch_indices(it: int, n: int, batch_size: int, seed: int) -> list[int]:
    """Example indices of iteration ``it``: epochs are seeded permutations, so no state to save."""
    out = []
    for pos in range(it * batch_size, (it + 1) * batch_size):
        epoch, k = divmod(pos, n)
        out.append(int(np.random.default_rng([seed, epoch]).permutation(n)[k]))
    return out


def train(cfg: DetectorConfig, examples: Sequence, out_dir: str | Path, *, resume: bool = True,
          progress: bool = True, device: str | torch.device = 'cpu', init: str | Path | None = None) -> TrainSummary:
    """Train for ``cfg.train.iterations`` on ``examples`` (len + indexing, items TrainExample or
    4/5-tuples), checkpointing to ``out_dir`` every ``cfg.train.checkpoint_every`` iterations.
    With ``resume`` an existing checkpoint there is continued (its architecture must match).
    ``init``: a detector checkpoint whose weights a new run starts from (fine-tuning: a fresh
    optimizer and schedule; ignored when a checkpoint is resumed).
    ``device``: where the network trains (batches are prepared on the CPU)."""
    tc = cfg.train
    if len(examples) == 0:
        raise ValueError('no training examples')
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(tc.seed)
    device = torch.device(device)
    model = Detector(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    start = 0
    if resume and (out / CHECKPOINT).exists():
        ckpt = read_checkpoint(out / CHECKPOINT)
        check_config(ckpt['config'], cfg, out / CHECKPOINT, 'the training config')
        model.load_state_dict(ckpt['model'])
        opt.load_state_dict(ckpt['optimizer'])
        torch.set_rng_state(ckpt['torch_rng'])
        if device.type == 'cuda' and 'cuda_rng' in ckpt:
            torch.cuda.set_rng_state(ckpt['cuda_rng'], device)
        start = int(ckpt['iteration'])
        log.info('resuming %s at iteration %d', out / CHECKPOINT, start)
        _truncate_log(out / LOG, start)
    elif init is not None:
        ckpt = read_checkpoint(init)
        check_config(ckpt['config'], cfg, init, 'the training config')
        model.load_state_dict(ckpt['model'])
        log.info('starting from the weights of %s', init)
        _truncate_log(out / LOG, 0)

    database = ground_truth_database(cfg, examples, out, progress) if any(tc.augment.gt_sampling) else None

    def checkpoint(it: int) -> None:
        # the training dropout masks are drawn on the device: its generator state resumes too
        cuda_rng = {'cuda_rng': torch.cuda.get_rng_state(device)} if device.type == 'cuda' else {}
        save_checkpoint(out / CHECKPOINT, model, optimizer=opt.state_dict(), iteration=it,
                        torch_rng=torch.get_rng_state(), **cuda_rng)

    losses: dict[str, float] = {}
    bar = tqdm(total=tc.iterations, initial=start, unit='it', desc='train detector', disable=not progress)
    with open(out / LOG, 'a') as logf:
        for it in range(start, tc.iterations):
            t0 = time.perf_counter()
            idx = batch_indices(it, len(examples), tc.batch_size, tc.seed)
            batch = prepare_batch([examples[i] for i in idx], cfg, np.random.default_rng([tc.seed, it]), database)
            for g in opt.param_groups:
                g['lr'] = lr_at(it, tc)
            if len(batch.features) == 0:
                log.warning('iteration %d: batch %s has no points in range, skipped', it, idx)
            else:
                maps = model(batch.coords.to(device), batch.features.to(device), batch.size)
                loss, parts = detection_loss(maps, batch.targets.to(device), cfg)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
                opt.step()
                losses = {k: float(v) for k, v in parts.items()}
            bar.update(1)
            bar.set_postfix({k: f'{v:.3f}' for k, v in losses.items()})
            done = it + 1
            if done % tc.log_every == 0 or done == tc.iterations:
                logf.write(json.dumps({'iteration': done, **losses, 'lr': lr_at(it, tc),
                                       'sec_per_it': time.perf_counter() - t0}) + '\n')
                logf.flush()
            if done % tc.checkpoint_every == 0 or done == tc.iterations:
                checkpoint(done)
    bar.close()
    save_checkpoint(out / FINAL, model.eval().cpu())
    return TrainSummary(tc.iterations, losses, out / CHECKPOINT, out / FINAL)


def ground_truth_database(cfg: DetectorConfig, examples: Sequence, out: Path, progress: bool) -> GroundTruthDatabase:
    """The run folder's database of objects to paste, built from ``examples`` on the first start
    and read back when the run resumes."""
    path = out / GT_DATABASE
    if path.exists():
        return GroundTruthDatabase.load(path)
    db = build_database(examples, cfg.voxel, cfg.train.augment.gt_sampling_min_points, progress)
    log.info('ground-truth database: %d objects (%s)', len(db),
             ', '.join(f'{name} {int((db.labels == k).sum())}' for k, name in enumerate(cfg.classes)))
    db.save(path)
    return db


def _truncate_log(path: Path, last: int) -> None:
    """Drop log rows a crashed run wrote after its last checkpoint; they are about to be redone."""
    if path.exists():
        rows = [line for line in path.read_text().splitlines() if json.loads(line)['iteration'] <= last]
        path.write_text(''.join(row + '\n' for row in rows))
