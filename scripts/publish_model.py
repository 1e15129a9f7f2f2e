"""Copy a finished training run's exported model into models/weights/ as a shipped card.

    python scripts/publish_model.py runs/mirnet-v2-denoise-s
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import models
from models.cards import WEIGHTS_DIR, ModelCard


def publish(run_dir: Path) -> ModelCard:
    card_data = json.loads((run_dir / "card.json").read_text())
    name = card_data["name"]
    target = WEIGHTS_DIR / f"{name}.safetensors"
    shutil.copyfile(run_dir / "model.safetensors", target)
    card = ModelCard.from_json({**card_data, "weights": target.name})
    digest = models.checkpoints.sha256_hex(target.read_bytes())
    if digest != card.sha256:
        raise SystemExit(f"{target}: sha256 {digest} differs from the run's card ({card.sha256})")
    (WEIGHTS_DIR / f"{name}.json").write_text(json.dumps(card.to_json(), indent=1) + "\n")
    return card


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dirs", nargs="+", type=Path)
    for run in parser.parse_args().run_dirs:
        card = publish(run)
        print(f"published {card.name} ({card.task}, x{card.scale}) sha256 {card.sha256}")
