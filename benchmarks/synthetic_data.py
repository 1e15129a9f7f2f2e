"""What synthetic dead-leaves training data adds on held-out photos.

Trains the fast denoiser's recipe twice with the same seed and steps, inline on the CPU:
once on the bundled training photos (jobs/experiments/denoise-small.yaml) and once on the
same photos mixed 1:1 with ``synthetic://dead_leaves`` (jobs/experiments/denoise-synthetic.yaml),
both shortened to ``--steps``. Each model is then scored on the held-out photos of
:mod:`benchmarks.quality` (chelsea, camera, coffee; full size) at sigma 15 / 25 / 50, with
the same seeded noise. Writes benchmarks/results/synthetic_data.json and prints a table.

    python -m benchmarks.synthetic_data --steps 500
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import models
from benchmarks.quality import SIGMAS, VALIDATION, Section, clean_photos, measure, model_methods, quantise
from pipeline.training.config import load_config
from pipeline.training.degrade import Degradation
from pipeline.training.launch import run_training

CONFIGS = {"photos": Path("jobs/experiments/denoise-small.yaml"),
           "photos + synthetic": Path("jobs/experiments/denoise-synthetic.yaml")}


def train(label: str, config: Path, steps: int, runs: Path) -> tuple[models.ModelCard, dict]:
    """Train one shortened run; its exported card and a summary (source, seconds, validation)."""
    overrides = {"name": f"synthetic-bench-{label.replace(' + ', '-')}", "train": {"steps": steps, "log_every": 50},
                 "optim": {"warmup_steps": max(1, steps // 50)}, "checkpoint": {"dir": str(runs), "every": steps},
                 "validate": {"every": steps}}
    cfg = load_config(config.read_text(), overrides)
    started = time.perf_counter()
    result = run_training(cfg, executor="inline", restart=True)
    seconds = time.perf_counter() - started
    folder = Path(result["run"])
    card = models.ModelCard.from_json(json.loads((folder / "card.json").read_text()), source_dir=str(folder))
    return card, {"config": str(config), "train_clean": cfg.data.train.clean, "steps": steps,
                  "train_seconds": round(seconds, 1), "final_val_psnr": result["history"][-1].get("val_psnr")}


def score_denoise(card: models.ModelCard) -> dict[str, float]:
    """Mean PSNR of ``card`` on the held-out photos at each sigma (benchmarks.quality's noise seeds)."""
    out = {}
    for sigma in SIGMAS:
        noise = Degradation("gaussian", sigma=(sigma, sigma))
        pairs = [(name, clean, quantise(noise(clean, np.random.default_rng(100 + i))))
                 for i, (name, clean) in enumerate(clean_photos())]
        section: Section = measure(model_methods([card]), pairs)
        out[f"sigma{sigma}"] = section[card.name]["psnr"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/synthetic_data.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as runs:
        for label, config in CONFIGS.items():
            card, summary = train(label, config, args.steps, Path(runs))
            results[label] = {**summary, "psnr": score_denoise(card)}
            print(label, "done", results[label], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"photos": list(VALIDATION), "sigmas": list(SIGMAS), "runs": results}, indent=1))
    print(f"\nmean PSNR (dB) on {', '.join(VALIDATION)}, full size, after {args.steps} steps\n")
    print("| training data | " + " | ".join(f"σ {s}" for s in SIGMAS) + " | train seconds |")
    print("|---|" + "---:|" * (len(SIGMAS) + 1))
    for label, r in results.items():
        print(f"| {label} | " + " | ".join(f"{r['psnr'][f'sigma{s}']:.2f}" for s in SIGMAS)
              + f" | {r['train_seconds']:.0f} |")


if __name__ == "__main__":
    main()
