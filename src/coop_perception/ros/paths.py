"""Files shipped with the package, wherever it is installed (no rclpy import)."""
from __future__ import annotations

from pathlib import Path

PACKAGE = 'coop_perception'


def package_path(*parts: str) -> Path:
    """A file shipped with the package: from the source tree when running from it (editable
    installs), else from the ament share directory of a colcon install."""
    source = Path(__file__).resolve().parents[3]
    if (source / 'package.xml').exists():
        return source.joinpath(*parts)
    try:
        from ament_index_python.packages import get_package_share_directory

        return Path(get_package_share_directory(PACKAGE)).joinpath(*parts)
    except (ImportError, LookupError):
        return source.joinpath(*parts)
