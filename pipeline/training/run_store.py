"""The files of one training run under ``CHECKPOINT_DIR/RUN_NAME/`` on any fsspec URL: checkpoints
(``checkpoints/step-NNNNNNNN.pt``), ``metrics.json``/``.csv``/``.png``, ``config.json``, the HTML
training report (``report.html``, via :mod:`pipeline.report`) and the validation crops (``val/``).

The exported model (``model.safetensors``, ``card.json``) is written here too, by
:func:`pipeline.training.loop.export`. Everything made for people (plot, report, crops) is best
effort: a failure is printed and training goes on.
"""
from __future__ import annotations

import csv
import io
import json
import sys
from typing import Any

import numpy as np
import torch

from ..storage import Storage
from .config import ExperimentConfig


class RunStore:
    """Files of one run: checkpoints, metrics, plot, report, validation crops, exported model."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.storage = Storage(f"{cfg.checkpoint.dir.rstrip('/')}/{cfg.name}", cfg.data.storage_options)
        self.url = self.storage.url
        self.cfg = cfg

    def checkpoints(self) -> list[str]:
        """Keys of the run's checkpoints, oldest first."""
        try:
            return sorted(k for k in self.storage.list(include=["checkpoints/step-*.pt"]))
        except FileNotFoundError:
            return []

    def latest(self) -> dict[str, Any] | None:
        """The newest checkpoint's state (model, optimizer, scheduler, step, config, history), or None."""
        keys = self.checkpoints()
        if not keys:
            return None
        data = self.storage.read(keys[-1])
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)

    def save_checkpoint(self, state: dict[str, Any]) -> str:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        key = f"checkpoints/step-{state['step']:08d}.pt"
        self.storage.write(key, buffer.getvalue())
        return key

    def remove_checkpoints(self) -> None:
        for key in self.checkpoints():
            self.storage.fs.rm(self.storage.path(key))

    def save_validation_crops(self, step: int, key: str, degraded: np.ndarray, restored: np.ndarray,
                              clean: np.ndarray) -> None:
        """Small 1:1 crops of one validation image at ``step``, for the training report (``val/``)."""
        from ..report import validation_crop_files

        try:
            for name, data in validation_crop_files(step, key, degraded, restored, clean).items():
                self.storage.write(name, data)
        except Exception as exc:
            report_failed("validation crops", exc)

    def save_metrics(self, history: list[dict[str, Any]]) -> None:
        """metrics.json/.csv, the metrics.png plot, config.json and the HTML training report (report.html)."""
        self.storage.write("metrics.json", json.dumps(history, indent=1).encode())
        fields = sorted({k for row in history for k in row}, key=lambda k: (k != "step", k))
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=fields)
        writer.writeheader()
        writer.writerows(history)
        self.storage.write("metrics.csv", text.getvalue().encode())
        self.storage.write("metrics.png", plot_history(history))
        config = self.cfg.public_dict()
        self.storage.write("config.json", json.dumps(config, indent=1).encode())
        from ..report import write_training_report

        try:
            write_training_report(self.storage, history=history, config=config)
        except Exception as exc:  # the report is for people; it never stops the training
            report_failed("training report", exc)


def report_failed(what: str, exc: BaseException) -> None:
    """Say that a part of the training report was not written (credentials masked)."""
    from ..redact import redact

    print(redact(f"{what} not written: {type(exc).__name__}: {exc}"), file=sys.stderr, flush=True)


def plot_history(history: list[dict[str, Any]]) -> bytes:
    """PNG of training loss and validation PSNR over steps."""
    from ..report import draw_loss, draw_psnr, figure_data, new_figure

    figure = new_figure((10, 3.6), 2)
    draw_loss(figure.axes[0], history)
    draw_psnr(figure.axes[1], history)
    return figure_data(figure)
