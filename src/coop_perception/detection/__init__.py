"""LiDAR BEV 3D detector with aleatoric and MC-dropout uncertainty (see models/detector.yaml).

Typical use::

    det = load_detector('models/detector.pt', 'models/detector.yaml')
    apply_threads(det.cfg)            # once per process, in the entry point
    out = det.detect(points)          # (N, 3+) sensor-frame scan -> Detections
"""
from .checkpoint import load_detector, save_checkpoint
from .config import DetectorConfig, load_config
from .decode import UNCERTAINTY_FIELDS, BevGrid, Detections
from .model import Detector, apply_threads

__all__ = ['BevGrid', 'Detections', 'Detector', 'DetectorConfig', 'UNCERTAINTY_FIELDS',
           'apply_threads', 'load_config', 'load_detector', 'save_checkpoint']
