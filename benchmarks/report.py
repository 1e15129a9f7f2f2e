"""Printing and saving a benchmark's figures."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit(report: dict[str, Any], json_path: str | None, quiet: bool = False) -> dict[str, Any]:
    """Print ``report`` as one JSON line (unless ``quiet``) and, if asked, save it (indented) to ``json_path``."""
    if not quiet:
        print(json.dumps(report))
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=1))
    return report
