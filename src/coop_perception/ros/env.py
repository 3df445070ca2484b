"""The ROS process environment: loopback-only discovery where the package asks for it, and a
Fast DDS profile for large messages.

The nodes take discovery (``ROS_DOMAIN_ID``, ``ROS_AUTOMATIC_DISCOVERY_RANGE``,
``ROS_LOCALHOST_ONLY``, ``ROS_STATIC_PEERS``), ``RMW_IMPLEMENTATION`` and any Fast DDS profile as
the user set them: a deployment spans several computers. Only the tests, the demo, the benchmarks
and ``coop-perception launch`` in its local mode call :func:`use_local_discovery`.
"""
from __future__ import annotations

import os
import tempfile

# Discovery that never leaves the loopback interface (Jazzy+ reads the first, older distros the
# second).
LOCAL_DISCOVERY = {'ROS_AUTOMATIC_DISCOVERY_RANGE': 'LOCALHOST', 'ROS_LOCALHOST_ONLY': '1'}

FASTDDS_PROFILES_ENV = 'FASTDDS_DEFAULT_PROFILES_FILE'
# Fast DDS's own switch for its transports (e.g. LARGE_DATA): a choice of the user's, like a profile.
FASTDDS_TRANSPORTS_ENV = 'FASTDDS_BUILTIN_TRANSPORTS'

# A participant profile that adds a shared-memory transport with a large segment. The segment
# belongs to the sender: Fast DDS's default is 512 KiB and it drops (never blocks) a fragment that
# does not fit, so best-effort PointCloud2 scans of ~1 MB get lost whenever the subscriber is a
# few fragments behind. With loopback-only discovery rmw_fastrtps appends its own loopback UDP
# transport to these; with any other discovery range it adds none, so the profile brings UDPv4
# itself, or the node could reach no other computer (and no process that lacks shared memory).
_LARGE_SHM_PROFILE = """<?xml version="1.0" encoding="UTF-8" ?>
<dds xmlns="http://www.eprosima.com">
  <profiles>
    <transport_descriptors>
      <transport_descriptor>
        <transport_id>coop_perception_large_shm</transport_id>
        <type>SHM</type>
        <segment_size>{segment_bytes}</segment_size>
      </transport_descriptor>
      <transport_descriptor>
        <transport_id>coop_perception_udp</transport_id>
        <type>UDPv4</type>
      </transport_descriptor>
    </transport_descriptors>
    <participant profile_name="coop_perception_large_data" is_default_profile="true">
      <rtps>
        <userTransports>{transports}</userTransports>
        <useBuiltinTransports>false</useBuiltinTransports>
      </rtps>
    </participant>
  </profiles>
</dds>
"""


def use_local_discovery(environ=None) -> dict:
    """Set (overwrite) the loopback-only discovery variables in ``environ`` (default: this
    process, which must happen before ``rclpy.init``); returns ``environ`` for passing to a child
    process. For tests, the demo, benchmarks and local launches only, never in a node."""
    environ = os.environ if environ is None else environ
    environ.update(LOCAL_DISCOVERY)
    return environ


def discovery_is_local(environ=None) -> bool:
    """Whether ``environ`` asks for loopback-only discovery: ``ROS_AUTOMATIC_DISCOVERY_RANGE`` is
    LOCALHOST, or ``ROS_LOCALHOST_ONLY`` is 1 (older distros read only that one, Jazzy lets it
    win over the range, Kilted ignores it: counting it errs on the side of staying local)."""
    environ = os.environ if environ is None else environ
    return (environ.get('ROS_AUTOMATIC_DISCOVERY_RANGE', '').upper() == 'LOCALHOST'
            or environ.get('ROS_LOCALHOST_ONLY') == '1')


def use_large_shm_segment(segment_mb: float, environ=None) -> str | None:
    """Give this process's Fast DDS participant a ``segment_mb`` shared-memory segment for sending.

    Only when the RMW is Fast DDS and the user has neither a Fast DDS profile file of their own nor
    chose its transports (``FASTDDS_BUILTIN_TRANSPORTS``); call before ``rclpy.init``. Returns the
    profile path written (the caller removes it after shutdown), or None when nothing was changed.
    """
    environ = os.environ if environ is None else environ
    rmw = environ.get('RMW_IMPLEMENTATION', 'rmw_fastrtps_cpp')
    if (segment_mb <= 0 or not rmw.startswith('rmw_fastrtps') or environ.get(FASTDDS_PROFILES_ENV)
            or environ.get(FASTDDS_TRANSPORTS_ENV)):
        return None
    fd, path = tempfile.mkstemp(prefix='coop_perception_fastdds_', suffix='.xml')
    with os.fdopen(fd, 'w') as f:
        transports = ['coop_perception_large_shm'] + ([] if discovery_is_local(environ) else ['coop_perception_udp'])
        f.write(_LARGE_SHM_PROFILE.format(segment_bytes=int(segment_mb * 2**20),
                                          transports=''.join(f'<transport_id>{t}</transport_id>' for t in transports)))
    environ[FASTDDS_PROFILES_ENV] = path
    return path
