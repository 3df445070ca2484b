"""Process environment every ROS process of this package starts with."""
from __future__ import annotations

import os
import tempfile

# DDS discovery must never leave the loopback interface (Jazzy+ reads the first, older distros
# the second).
LOCAL_DISCOVERY = {'ROS_AUTOMATIC_DISCOVERY_RANGE': 'LOCALHOST', 'ROS_LOCALHOST_ONLY': '1'}

FASTDDS_PROFILES_ENV = 'FASTDDS_DEFAULT_PROFILES_FILE'

# A participant profile that adds a shared-memory transport with a large segment. The segment
# belongs to the sender: Fast DDS's default is 512 KiB and it drops (never blocks) a fragment that
# does not fit, so best-effort PointCloud2 scans of ~1 MB get lost whenever the subscriber is a
# few fragments behind. rmw_fastrtps appends its own transports (localhost discovery) to these.
_LARGE_SHM_PROFILE = """<?xml version="1.0" encoding="UTF-8" ?>
<dds xmlns="http://www.eprosima.com">
  <profiles>
    <transport_descriptors>
      <transport_descriptor>
        <transport_id>coop_perception_large_shm</transport_id>
        <type>SHM</type>
        <segment_size>{segment_bytes}</segment_size>
      </transport_descriptor>
    </transport_descriptors>
    <participant profile_name="coop_perception_large_data" is_default_profile="true">
      <rtps>
        <userTransports><transport_id>coop_perception_large_shm</transport_id></userTransports>
        <useBuiltinTransports>false</useBuiltinTransports>
      </rtps>
    </participant>
  </profiles>
</dds>
"""


def use_local_discovery(environ=None) -> dict:
    """Set the loopback-only discovery variables in ``environ`` (default: this process, which
    must happen before ``rclpy.init``); returns ``environ`` for passing to a child process."""
    environ = os.environ if environ is None else environ
    environ.update(LOCAL_DISCOVERY)
    return environ


def use_large_shm_segment(segment_mb: float, environ=None) -> str | None:
    """Give this process's Fast DDS participant a ``segment_mb`` shared-memory segment for sending.

    Only when the RMW is Fast DDS and the user has no Fast DDS profile file of their own; call
    before ``rclpy.init``. Returns the profile path written (the caller removes it after shutdown),
    or None when nothing was changed.
    """
    environ = os.environ if environ is None else environ
    rmw = environ.get('RMW_IMPLEMENTATION', 'rmw_fastrtps_cpp')
    if segment_mb <= 0 or not rmw.startswith('rmw_fastrtps') or environ.get(FASTDDS_PROFILES_ENV):
        return None
    fd, path = tempfile.mkstemp(prefix='coop_perception_fastdds_', suffix='.xml')
    with os.fdopen(fd, 'w') as f:
        f.write(_LARGE_SHM_PROFILE.format(segment_bytes=int(segment_mb * 2**20)))
    environ[FASTDDS_PROFILES_ENV] = path
    return path
