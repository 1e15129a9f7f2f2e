"""Launching a training run (:func:`run_training`) on one of two executors: Ray Train
(``scaling.num_workers`` workers, DDP: gloo on the CPU, NCCL on GPUs; the training images read as
a Ray Dataset), or inline (one worker in this process, on one GPU or the CPU, without Ray).

A rerun with the same run name resumes from the latest checkpoint; on Ray, a worker failure
restarts the workers (up to ``failure.max_failures`` times), which resume the same way.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import replace
from typing import Any

import torch

import models

from .config import ConfigError, ExperimentConfig, RunOptions, SplitConfig
from .data import build_dataset, has_photos, load_training_pairs, map_urls, pairs_from_rows
from .loop import Trainer, WorkerContext, init_model
from .run_store import RunStore

EXECUTORS = ("ray", "inline")


def run_training(cfg: ExperimentConfig, *, resume: bool = False, restart: bool = False, address: str | None = None,
                 stop_after: int | None = None, executor: str = "ray") -> dict[str, Any]:
    """Train (or resume) the run described by ``cfg``; returns a summary: ``run`` (its URL),
    ``step`` reached, ``resumed_from`` (0 for a fresh start) and the metric ``history``.

    ``executor``: "ray" runs ``scaling.num_workers`` Ray Train workers (DDP) on the embedded
    runtime or the cluster at ``address``; "inline" runs one worker in this process, without Ray.
    ``stop_after``: stop (with a checkpoint) after this many steps in total.
    """
    if executor not in EXECUTORS:
        raise ConfigError(f"unknown executor {executor!r}; choose one of {', '.join(EXECUTORS)}")
    if stop_after is not None and stop_after < 1:
        raise ConfigError(f"stop_after {stop_after} must be at least 1 (None: train to train.steps)")
    if executor == "inline" and address:
        raise ConfigError("a cluster address needs the ray executor; the inline executor trains in this process")
    init_as_given = cfg.model.init  # recorded in the recipe as written, not as this machine's path
    cfg = absolute_paths(cfg)
    store = RunStore(cfg)
    existing = store.checkpoints()
    if resume and not existing:
        raise ConfigError(f"--resume: no checkpoint found under {store.url}/checkpoints/")
    if restart:
        store.remove_checkpoints()
    _, init_sha256 = init_model(cfg)  # a bad model.init fails here, before any worker starts
    options = RunOptions(stop_after=stop_after, init_sha256=init_sha256, init_as_given=init_as_given)
    if executor == "inline":
        Trainer(cfg, options, inline_context(cfg)).run()
    else:
        _fit_on_ray(cfg, options, address)
    state = store.latest()
    return {"run": store.url, "step": int(state["step"]) if state else 0,
            "resumed_from": int(existing[-1].rsplit("-", 1)[-1].split(".")[0]) if existing and not restart else 0,
            "history": json.loads(state["history"]) if state else []}


def _absolute(url: str | None) -> str | None:
    """Local relative paths made absolute: Ray workers run in other folders."""
    if not url or "://" in url:
        return url
    return os.path.abspath(url)


def absolute_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with its local relative paths (checkpoint dir, data, ``model.init`` file) made absolute."""
    def split(part: SplitConfig) -> SplitConfig:
        return replace(part, clean=map_urls(part.clean, _absolute), degraded=_absolute(part.degraded))

    init = cfg.model.init if models.lookup(cfg.model.init) is not None else _absolute(cfg.model.init)
    return cfg.replace(checkpoint=replace(cfg.checkpoint, dir=_absolute(cfg.checkpoint.dir)),
                       model=replace(cfg.model, init=init),
                       data=replace(cfg.data, train=split(cfg.data.train), val=split(cfg.data.val)))


def inline_context(cfg: ExperimentConfig) -> WorkerContext:
    """One worker in this process, without Ray: reads the training images itself."""
    s, d = cfg.scaling, cfg.data
    if s.num_workers != 1:
        raise ConfigError(f"the inline executor trains one worker; scaling.num_workers is {s.num_workers}")
    if s.use_gpu and not torch.cuda.is_available():
        raise ConfigError("scaling.use_gpu is set, but torch sees no CUDA GPU on this machine")
    device = torch.device("cuda" if s.use_gpu else "cpu")
    pairs = load_training_pairs(d.train.clean, d.train.degraded, d.storage_options)

    def report(record: dict[str, Any]) -> None:
        print(" ".join(f"{k} {v:.5g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()),
              file=sys.stderr, flush=True)

    return WorkerContext(0, 1, device, pairs, lambda module: module.to(device), report)


def ray_worker_context(photos: bool = True) -> WorkerContext:
    """The context of a Ray Train worker: its rank, device and shard of the training images
    (none without ``photos``: synthetic sources only)."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    pairs = pairs_from_rows(list(ray.train.get_dataset_shard("train").iter_rows())) if photos else []
    return WorkerContext(ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device(), pairs,
                         ray.train.torch.prepare_model, ray.train.report)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's entry point on each worker: ``loop_config`` holds the config and the run options."""
    cfg: ExperimentConfig = loop_config["config"]
    options: RunOptions = loop_config["options"]
    Trainer(cfg, options, ray_worker_context(photos=has_photos(cfg.data.train.clean))).run()


def _fit_on_ray(cfg: ExperimentConfig, options: RunOptions, address: str | None) -> None:
    """Run the training loop on Ray Train workers, with the training images as a Ray Dataset."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from ..ray_runtime import connect

    connect(address)
    d, s = cfg.data, cfg.scaling
    dataset = build_dataset(d.train.clean, d.train.degraded, d.storage_options)
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config={"config": cfg, "options": options},
        scaling_config=ray.train.ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                               resources_per_worker={"CPU": s.cpus_per_worker}),
        run_config=ray.train.RunConfig(name=f"{cfg.name}-{time.strftime('%Y%m%dT%H%M%S')}",
                                       failure_config=ray.train.FailureConfig(max_failures=cfg.failure.max_failures),
                                       storage_path=os.path.join(os.path.expanduser("~"), "ray_results")),
        datasets={"train": dataset} if dataset is not None else {})
    trainer.fit()
