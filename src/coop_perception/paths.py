"""Files shipped with the package (models, config, launch), wherever it is installed."""
from __future__ import annotations

from pathlib import Path

PACKAGE = 'coop_perception'


def package_path(*parts: str) -> Path:
    """A file shipped with the package: from the source tree when running from it (editable
    installs), else from the share directory of a colcon install — found beside this module's
    install prefix (<prefix>/lib/pythonX.Y/site-packages/coop_perception), so an unsourced
    install works too — else from the ament index."""
    here = Path(__file__).resolve()
    source = here.parents[2]
    if (source / 'package.xml').exists():
        return source.joinpath(*parts)
    share = here.parents[4] / 'share' / PACKAGE
    if (share / 'package.xml').exists():
        return share.joinpath(*parts)
    try:
        from ament_index_python.packages import get_package_share_directory

        return Path(get_package_share_directory(PACKAGE)).joinpath(*parts)
    except (ImportError, LookupError):
        return source.joinpath(*parts)
