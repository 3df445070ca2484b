"""Topic names of the runtime, in one place for the nodes, the launcher and the live-run tools.

Per-agent topics are relative: a node in namespace ``/agent{k}`` resolves them under it, and
``agent_topic`` spells the absolute name for a process outside the namespace. The bag's own topics
(``/agent{k}/lidar``, ``/agent{k}/odom``, ...) are in ``coop_perception.data.bag``. No rclpy here.
"""
LIDAR = 'lidar'                            # an agent's scans (recorded: data.bag.lidar_topic)
ODOM = 'odom'                              # its sensor pose (data.bag.odom_topic)
FEATURES = 'coop/features'                 # a detector's compact ROI features (V2X)
LOCAL_OBJECTS = 'coop/objects'             # a detector's own object list
LOCAL_MARKERS = 'coop/detections'          # a detector's own boxes for RViz
EGO_MAP = 'coop/bev'                       # the ego detector's full feature map, to its fusion
DETECTOR_STATUS = 'coop/detector_status'
V2X_FEATURES = 'v2x/features'              # collaborators' features as the channel delivers them
V2X_ODOM = 'v2x/odom'
V2X_STATUS = 'v2x/status'

FUSED_OBJECTS = '/coop/objects'
FUSED_MARKERS = '/coop/detections'
FUSED_DETECTION3D = '/coop/detections_3d'
FUSION_STATUS = '/coop/status'
REPUTATION_MARKERS = '/coop/reputation'


def agent_topic(agent: int, name: str) -> str:
    """The absolute name of per-agent topic ``name`` of agent ``agent``."""
    return f'/agent{agent}/{name}'
