"""LiDAR BEV 3D detector with aleatoric and MC-dropout uncertainty (see models/detector.yaml).

Typical use::

    from coop_perception.detection.checkpoint import load_detector
    from coop_perception.detection.model import apply_threads

    det = load_detector('models/detector.pt', 'models/detector.yaml')
    apply_threads(det.cfg)            # once per process, in the entry point
    out = det.detect(points)          # (N, 3+) sensor-frame scan -> Detections

The package itself imports nothing, so that registering commands (``detection.commands``) does
not load torch.
"""
