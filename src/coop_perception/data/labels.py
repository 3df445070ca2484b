"""Detection classes and their mapping from V2X-Sim category names (the one place).

V2X-Sim is recorded in CARLA; its category names may follow nuScenes (``vehicle.car``) or be
CARLA blueprint ids (``vehicle.audi.tt``), so one table holds both vocabularies.
"""
from __future__ import annotations

import functools

CLASSES = ('car', 'truck', 'pedestrian', 'cyclist')

# CARLA 0.9 blueprint ids, grouped by the class they map to.
CARLA_CARS = (
    'vehicle.audi.a2', 'vehicle.audi.etron', 'vehicle.audi.tt', 'vehicle.bmw.grandtourer', 'vehicle.bmw.isetta',
    'vehicle.chevrolet.impala', 'vehicle.citroen.c3', 'vehicle.dodge_charger.police',
    'vehicle.jeep.wrangler_rubicon', 'vehicle.lincoln.mkz2017', 'vehicle.mercedes-benz.coupe',
    'vehicle.mini.cooperst', 'vehicle.mustang.mustang', 'vehicle.nissan.micra', 'vehicle.nissan.patrol',
    'vehicle.seat.leon', 'vehicle.tesla.model3', 'vehicle.toyota.prius',
    'vehicle.volkswagen.t2',                 # a van, and vans are cars here
)
CARLA_LARGE_VEHICLES = (
    'vehicle.carlamotors.carlacola', 'vehicle.tesla.cybertruck', 'vehicle.carlamotors.firetruck',
    'vehicle.carlamotors.european_hgv', 'vehicle.ford.ambulance', 'vehicle.mitsubishi.fusorosa',
)
CARLA_TWO_WHEELERS = (
    'vehicle.bh.crossbike', 'vehicle.diamondback.century', 'vehicle.gazelle.omafiets',
    'vehicle.harley-davidson.low_rider', 'vehicle.kawasaki.ninja', 'vehicle.yamaha.yzf', 'vehicle.vespa.zx125',
)

# The one table. Keys are exact names or prefixes: a key matches itself and every name below it
# ('vehicle.bus' matches 'vehicle.bus.rigid'); the longest matching key wins. A value is a class
# of CLASSES, or None for categories that are known but not detected.
CATEGORY_CLASSES: dict[str, str | None] = {
    # nuScenes vocabulary
    'vehicle.car': 'car',
    'vehicle.van': 'car',                    # the synthetic generator's vans
    'vehicle.emergency.police': 'car',       # police cars are cars
    'vehicle.emergency.ambulance': 'truck',
    'vehicle.truck': 'truck',
    'vehicle.bus': 'truck',                  # .rigid, .bendy
    'vehicle.trailer': 'truck',
    'vehicle.construction': 'truck',
    'vehicle.bicycle': 'cyclist',
    'vehicle.motorcycle': 'cyclist',
    'human.pedestrian': 'pedestrian',        # .adult, .child, .construction_worker, ...
    'animal': None,
    'movable_object': None,                  # .barrier, .trafficcone, .debris, .pushable_pullable
    'static_object': None,                   # .bicycle_rack
    # CARLA vocabulary
    **dict.fromkeys(CARLA_CARS, 'car'),
    **dict.fromkeys(CARLA_LARGE_VEHICLES, 'truck'),
    **dict.fromkeys(CARLA_TWO_WHEELERS, 'cyclist'),
    'walker.pedestrian': 'pedestrian',       # walker.pedestrian.0001, ...
    # Any other CARLA vehicle blueprint: CARLA's catalogue is mostly passenger cars. Names that
    # reach this key are reported (`category_coverage`), never taken silently.
    'vehicle': 'car',
}
FALLBACK_KEY = 'vehicle'


@functools.cache
def _matching_key(name: str) -> str | None:
    best = None
    for key in CATEGORY_CLASSES:
        if (name == key or name.startswith(key + '.')) and (best is None or len(key) > len(best)):
            best = key
    return best


@functools.cache
def category_to_label(name: str) -> int:
    """Category name -> index into CLASSES, or -1 for categories we do not detect or do not know."""
    key = _matching_key(name)
    cls = CATEGORY_CLASSES[key] if key is not None else None
    return CLASSES.index(cls) if cls is not None else -1


def category_coverage(names) -> dict:
    """How a dataset's category names map: {'classes': {name: class or None (known, not
    detected)}, 'fallback': names only the 'vehicle' fallback maps (to car), 'unmapped': names
    the table does not know (they become -1, 'other')}."""
    classes, fallback, unmapped = {}, [], []
    for name in sorted(set(names)):
        key = _matching_key(name)
        if key is None:
            unmapped.append(name)
            continue
        classes[name] = CATEGORY_CLASSES[key]
        if key == FALLBACK_KEY:
            fallback.append(name)
    return {'classes': classes, 'fallback': fallback, 'unmapped': unmapped}
