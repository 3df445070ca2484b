"""Detection classes and their mapping from nuScenes / V2X-Sim category names (the one place)."""
from __future__ import annotations

CLASSES = ('car', 'truck', 'pedestrian', 'cyclist')

# Longest matching prefix wins; V2X-Sim uses nuScenes category names.
_PREFIX_TO_CLASS = {
    'vehicle.car': 'car',
    'vehicle.van': 'car',
    'vehicle.truck': 'truck',
    'vehicle.bus': 'truck',
    'vehicle.trailer': 'truck',
    'vehicle.construction': 'truck',
    'vehicle.emergency': 'truck',
    'human.pedestrian': 'pedestrian',
    'vehicle.bicycle': 'cyclist',
    'vehicle.motorcycle': 'cyclist',
}


def category_to_label(name: str) -> int:
    """nuScenes category name -> index into CLASSES, or -1 for classes we do not detect."""
    best = ''
    for prefix in _PREFIX_TO_CLASS:
        if (name == prefix or name.startswith(prefix + '.')) and len(prefix) > len(best):
            best = prefix
    return CLASSES.index(_PREFIX_TO_CLASS[best]) if best else -1
