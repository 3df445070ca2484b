"""Training of the trust-modulated fusion on cached detector features (backbone and head frozen).

Each example is one vehicle agent's frame as ego; every other agent (road-side unit included)
contributes the ROI message it would have sent, picked under a random communication latency (the
newest scan whose capture + latency is not after the ego's capture), warped and motion-compensated
into the ego grid exactly as at run time. The loss is the detector's own loss on the cooperative
ground truth (objects any agent has LiDAR returns on) at the ego's capture time.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..data.ground_truth import cooperative_targets
from ..data.synth import RSU_AGENT
from ..detection.config import build_strict, read_yaml_mapping
from ..detection.targets import batch_targets, detection_loss, example_targets
from ..errors import UserError
from .align import warp_to_ego
from .cache import FeatureCache
from .model import FusionInputs, FusionModel, collate, stack_inputs
from .pipeline import Sender, collaborator_message
from .trust import BoxTrust

log = logging.getLogger(__name__)
CHECKPOINT = 'checkpoint.pt'
FINAL = 'fusion.pt'


@dataclass
class FusionTrainConfig:
    iterations: int = 2000
    batch_size: int = 2
    lr: float = 1e-3
    weight_decay: float = 1e-4
    max_latency_ms: float = 600.0      # uniform latency per collaborator message
    loss_probability: float = 0.1      # a collaborator's message is lost
    slots: int = 4                     # collaborators per ego frame
    scales: int = 2
    checkpoint_every: int = 200
    seed: int = 0


def load_fusion_config(path) -> FusionTrainConfig:
    """The training settings in a YAML such as ``models/fusion.yaml`` (those the shipped
    ``models/fusion.pt`` was trained with), parsed as strictly as the detector's config: every
    FusionTrainConfig key, no other, each of its type; else a UserError naming the file and key."""
    source = str(path)
    cfg = build_strict(FusionTrainConfig, read_yaml_mapping(path, 'fusion config'), source, check_types=True)
    for name in ('iterations', 'batch_size', 'slots', 'scales', 'checkpoint_every'):
        if getattr(cfg, name) < 1:
            raise UserError(source, f'{name} must be >= 1, got {getattr(cfg, name)}')
    if not (cfg.lr > 0 and cfg.weight_decay >= 0 and cfg.max_latency_ms >= 0 and 0 <= cfg.loss_probability < 1):
        raise UserError(source, 'lr must be > 0, weight_decay and max_latency_ms >= 0, loss_probability in [0, 1)')
    return cfg


def delayed_frame(stamps_ns: np.ndarray, ego_stamp_ns: int, latency_ns: int) -> int | None:
    """Newest frame index whose message (capture + latency) has arrived by the ego stamp."""
    ok = np.flatnonzero(stamps_ns + latency_ns <= ego_stamp_ns)
    return int(ok[-1]) if len(ok) else None


class FusionExamples:
    """Indexable (scene, frame, ego) examples drawn from a dataset and its feature cache."""

    def __init__(self, dataset, cache: FeatureCache, roi_policy: dict | None = None):
        self.dataset, self.cache = dataset, cache
        # the network learns from collaborator cells, which compact records do not carry
        self.roi_policy = {**(roi_policy or {}), 'format': 'cells'}
        self._velocities: dict = {}
        self.index = []
        # capture stamps (ns) per (scene, agent) and frame; missing scans never arrive
        self.stamps: dict[tuple[int, int], np.ndarray] = {}
        for s in range(len(dataset.scenes)):
            n = dataset.num_frames(s)
            for f in range(n):
                for k, agent in dataset.sample(s, f).agents.items():
                    self.stamps.setdefault((s, k), np.full(n, np.iinfo(np.int64).max // 2, np.int64))
                    self.stamps[(s, k)][f] = agent.timestamp_us * 1000
                    if k != RSU_AGENT:
                        self.index.append((s, f, k))

    def __len__(self) -> int:
        return len(self.index)

    def tracked_velocities(self, scene: int, agent) -> list:
        """Per frame of ``scene``, the (N, 2) velocities (m/s) ``agent``'s sender reports for its
        detections: its tracker run over all its scans in capture order, as at run time and in
        `eval fusion` (a tracker that had seen one previous scan would train the fusion on the
        much worse velocities of young tracks). Computed once per (scene, agent)."""
        key = (scene, agent)
        if key not in self._velocities:
            sender, name = Sender(), self.dataset.sample(scene, 0).scene_name
            tracked = []
            for f in range(self.dataset.num_frames(scene)):
                if agent not in self.dataset.sample(scene, f).agents:
                    tracked.append(None)
                    continue
                view = self.cache.load(name, f, agent)
                tracked.append(sender.prepare(view.detections, view.T_world_sensor, view.stamp_ns).velocities)
            self._velocities[key] = tracked
        return self._velocities[key]

    def example(self, i: int, rng: np.random.Generator, cfg: FusionTrainConfig):
        s, f, ego = self.index[i]
        sample = self.dataset.sample(s, f)
        scene = sample.scene_name
        ego_view = self.cache.load(scene, f, ego)
        warped = []
        for k in sorted(sample.agents):
            if k == ego or rng.random() < cfg.loss_probability:
                continue
            latency = int(rng.uniform(0, cfg.max_latency_ms) * 1e6)
            j = delayed_frame(self.stamps[(s, k)][:f + 1], ego_view.stamp_ns, latency)
            if j is None:
                continue
            view = self.cache.load(scene, j, k)
            det = replace(view.detections, velocities=self.tracked_velocities(s, k)[j])
            msg = collaborator_message(det, k, view.stamp_ns, self.roi_policy)
            warped.append(warp_to_ego(msg, view.T_world_sensor, ego_view.T_world_sensor, self.cache.grid,
                                      ego_view.stamp_ns, motion_compensation=True))
        rng.shuffle(warped)
        inputs = stack_inputs(ego_view.detections.features, warped, cfg.slots)
        return inputs, cooperative_targets(sample, ego), ego_view.detections.sensor_height


def train_fusion(detector, examples: FusionExamples, out_dir, cfg: FusionTrainConfig,
                 resume: bool = True, progress: bool = True, box_trust: BoxTrust | None = None,
                 device: str | torch.device = 'cpu') -> Path:
    """Train FusionModel with the detector frozen; resumable from out_dir/checkpoint.pt.
    ``box_trust`` (calibrated beforehand, fixed) weights the collaborators' cells with the learned
    trust (FusionModel.cell_trust) and is stored with the weights. ``device``: where the networks
    train (the detector is moved there)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    dcfg = detector.cfg
    device = torch.device(device)
    model = FusionModel(dcfg.model.feature_channels, cfg.scales).to(device).train()
    model.box_trust = box_trust
    detector.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    head = detector.head.eval()
    for p in detector.parameters():
        p.requires_grad_(False)
    start = 0
    if resume and (out / CHECKPOINT).exists():
        ckpt = torch.load(out / CHECKPOINT, map_location='cpu', weights_only=False)
        model.load_state_dict(ckpt['state'])
        opt.load_state_dict(ckpt['optimizer'])
        start = int(ckpt['iteration'])
        log.info('resuming fusion training at iteration %d', start)
    bar = tqdm(total=cfg.iterations, initial=start, desc='train fusion', unit='it', disable=not progress)
    with open(out / 'train_log.jsonl', 'a') as logf:
        for it in range(start, cfg.iterations):
            rng = np.random.default_rng([cfg.seed, it])
            picks = rng.choice(len(examples), cfg.batch_size, replace=False)
            inputs: list[FusionInputs] = []
            per_example = []
            for i in picks:
                x, (boxes, labels, vel), h = examples.example(int(i), rng, cfg)
                inputs.append(x)
                per_example.append(example_targets(boxes, labels, vel, h, dcfg))
            lr = cfg.lr * 0.5 * (1 + np.cos(np.pi * it / cfg.iterations))
            for g in opt.param_groups:
                g['lr'] = lr
            fused, trust = model(**collate(inputs, device))
            maps = head(fused)
            maps = {k: v.float() for k, v in maps.items() if k != 'cells'}
            loss, parts = detection_loss(maps, batch_targets(per_example, dcfg).to(device), dcfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            bar.update(1)
            row = {k: float(v) for k, v in parts.items()}
            bar.set_postfix({k: f'{v:.3f}' for k, v in row.items()})
            done = it + 1
            if done % 20 == 0:
                logf.write(json.dumps({'iteration': done, 'lr': lr, **row}) + '\n')
                logf.flush()
            if done % cfg.checkpoint_every == 0 or done == cfg.iterations:
                model.save(out / CHECKPOINT, optimizer=opt.state_dict(), iteration=done)
    bar.close()
    model.eval().save(out / FINAL, train_config=vars(cfg))
    return out / FINAL
