"""Where the evaluation data lives (WikiText-2, NQ-open, Wikipedia passages).

The data is never committed: benchmarks read it from ``--data DIR``, else ``$DRAGON_DATA``,
else the team's shared folder next to the repository (``../shared/data``), else the team's
shared folder where this workplace keeps it (``/work/shared/data``: a clone elsewhere, such as
CI's, still finds it).
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULTS = (Path(__file__).resolve().parents[1].parent / "shared" / "data", Path("/work/shared/data"))


def data_dir(option: str | os.PathLike | None = None) -> Path:
    """The data folder: the option, the environment, or the default; it must exist."""
    given = option or os.environ.get("DRAGON_DATA")
    candidates = [Path(given)] if given else list(DEFAULTS)
    for path in candidates:
        if path.is_dir():
            return path
    raise FileNotFoundError(f"no evaluation data at {' or '.join(map(str, candidates))} "
                            "(pass --data DIR or set DRAGON_DATA)")
