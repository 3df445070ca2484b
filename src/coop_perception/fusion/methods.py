"""The fusion methods, in one table: what each collaborator sends, how the ego weighs and fuses
it, what it needs loaded and where it runs. The pipeline, ``eval fusion``, the ROS node and the
command line all derive their behaviour and their choices from ``METHODS``; a new method is one
row here plus, if it needs one, a fusion stage in the pipeline."""
from __future__ import annotations

from dataclasses import dataclass

from .codec import FeatureMessage
from .payloads import BoxList, RawPoints

LEARNED = 'learned'   # trust from the fusion model's trust network
GATE = 'gate'         # trust from the thresholds calibrated on validation data (trust.ThresholdTrust)


@dataclass(frozen=True)
class FusionMethod:
    name: str
    # what every collaborator sends per scan; None: nothing (the ego alone)
    payload: type | None
    # feature methods: where each collaborator ROI cell's weight comes from (LEARNED, GATE);
    # None: every ROI cell at full weight
    trust: str | None
    # feature methods: the learned multi-scale fusion of the fusion model; False: element-wise max
    fusion_network: bool
    # collaborator inputs are moved to the ego stamp along their tracked velocity
    motion_compensation: bool
    # feature methods: also decode each collaborator ROI in its own grid and merge the
    # trust-weighted boxes (fusion.roi_boxes); CooperativeConfig.roi_boxes can switch it off
    roi_boxes: bool
    # the payload goes through the (delaying) channel; False: evaluated as arriving at once,
    # an upper bound that ignores delay
    delayed: bool
    summary: str
    # feature methods: the wire layout they need (fusion.sharing.SHARING_FORMATS); 'cells' for a
    # method that fuses cells and decodes no ROI boxes, which compact records (no features) leave
    # with nothing; None: whichever the senders use
    sharing: str | None = None

    @property
    def needs_fusion_model(self) -> bool:
        return self.fusion_network or self.trust == LEARNED

    @property
    def needs_gate(self) -> bool:
        return self.trust == GATE

    @property
    def runs_in_ros(self) -> bool:
        """The detector nodes share feature messages: the nodes run the methods that use them."""
        return self.payload in (None, FeatureMessage)


# name, payload, trust, fusion network, motion compensation, ROI boxes, delayed, summary[, sharing]
METHODS: dict[str, FusionMethod] = {row[0]: FusionMethod(*row) for row in (
    ('ego', None, None, False, False, False, True, 'the ego detector alone'),
    ('late', BoxList, None, False, True, False, True, "collaborators' boxes, motion-compensated, merged by NMS"),
    ('early', RawPoints, None, False, False, False, False, "collaborators' raw points detected with the ego's"),
    ('max', FeatureMessage, None, False, False, False, True, 'element-wise max of the ego map and every ROI cell',
     'cells'),
    ('trust', FeatureMessage, LEARNED, True, True, True, True, 'uncertainty trust, multi-scale fusion, ROI boxes'),
    ('gate', FeatureMessage, GATE, True, True, True, True, "'trust' with the calibrated threshold gate"),
    ('trust_flat', FeatureMessage, None, True, True, True, True, "'trust' with every trust fixed at 1 (ablation)"),
)}
ROS_METHODS = tuple(name for name, m in METHODS.items() if m.runs_in_ros)


def method_named(name: str) -> FusionMethod:
    """The method called ``name``; ValueError naming the choices otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f'unknown fusion method {name!r} (choose from {", ".join(METHODS)})') from None
