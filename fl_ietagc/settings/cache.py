"""The one cache root of the project: `$FL_IETAGC_CACHE`, else `~/.cache/fl-ietagc`.

Under it: `folders/` (decoded image folders), `fid/` (Inception reference statistics), `classifiers/` (the
offline quality classifier). Everything there can be deleted; it is rebuilt on the next use.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "FL_IETAGC_CACHE"


def cache_root(kind: str) -> Path:
    """The cache directory for `kind` (folders, fid, classifiers); not created here."""
    base = os.environ.get(CACHE_ENV)
    return (Path(base) if base else Path.home() / ".cache" / "fl-ietagc") / kind
