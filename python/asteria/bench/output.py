"""Where the benchmarks write their results."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(out_dir: str | Path, name: str, payload: Any, **dumps: Any) -> Path:
    """Writes ``payload`` as JSON to ``out_dir/name`` (the folder made if missing) and returns the path;
    ``dumps`` are passed to `json.dumps` (``indent=1`` unless given)."""
    path = Path(out_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, **{"indent": 1, **dumps}))
    return path
