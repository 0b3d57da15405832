"""Where the evaluation data lives (WikiText-2, NQ-open, Wikipedia passages).

The data is never committed: benchmarks read it from ``--data DIR``, else ``$DRAGON_DATA``,
else the team's shared folder next to the repository (``../shared/data``).
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def data_dir(option: str | os.PathLike | None = None) -> Path:
    """The data folder: the option, the environment, or the default; it must exist."""
    path = Path(option or os.environ.get("DRAGON_DATA") or DEFAULT)
    if not path.is_dir():
        raise FileNotFoundError(f"no evaluation data at {path} (pass --data DIR or set DRAGON_DATA)")
    return path
