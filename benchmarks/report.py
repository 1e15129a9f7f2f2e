"""Printing and saving a benchmark's figures."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit(report: dict[str, Any], json_path: str | None) -> dict[str, Any]:
    """Print ``report`` as one JSON line and, if asked, save it (indented) to ``json_path``."""
    print(json.dumps(report))
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=1))
    return report
