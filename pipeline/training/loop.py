"""The training loop of one worker (:class:`Trainer`): seed, model (random, or ``model.init``
weights to fine-tune), Adam with a linear warm-up and cosine schedule (:func:`lr_at`), Charbonnier
loss, patches prefetched in threads, resume from the run's latest checkpoint, periodic validation
and checkpoints, and the export of ``model.safetensors`` and ``card.json`` at the end.

Where it runs (a Ray Train worker or this process) comes in as a :class:`WorkerContext`, made by
:mod:`pipeline.training.launch`. Resuming repeats the run exactly: the same step, the same learning
rate, the same data stream (the patches of a step come from an RNG seeded by (seed, rank, step)).
"""
from __future__ import annotations

import collections
import functools
import json
import math
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

import models
from models.checkpoints import Checkpoint, load_weights, sha256_hex, to_bytes, unique_state_dict
from models.loaded import LoadedModel

from .config import ConfigError, ExperimentConfig, RunOptions
from .data import Pair, PatchSampler, parse_sources
from .degrade import Degradation
from .run_store import RunStore
from .validation import load_validation, validate


@dataclass
class WorkerContext:
    """Where the training loop runs: a Ray Train worker, or this process (the inline executor)."""

    rank: int
    world: int
    device: torch.device
    pairs: list[Pair]  # this worker's images of the photo sources
    prepare_model: Callable[[torch.nn.Module], torch.nn.Module]  # to the device (and DDP across workers)
    report: Callable[[dict[str, Any]], None]


def lr_at(step: int, cfg: ExperimentConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up, then cosine to min_lr."""
    o, total = cfg.optim, cfg.train.steps
    warm = o.warmup_steps
    if step < warm:
        return o.lr * (step + 1) / warm
    progress = min((step - warm) / max(total - warm, 1), 1.0)
    return o.min_lr + (o.lr - o.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def charbonnier(pred: torch.Tensor, target: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.sqrt((pred - target) ** 2 + eps * eps).mean()


def initial_weights(cfg: ExperimentConfig) -> tuple[str, Checkpoint]:
    """Read the checkpoint named by ``model.init`` (a card name or a path/URL)."""
    source = cfg.model.init
    card = models.lookup(source)
    uri = source if card is None else card.weights_uri
    if uri is None:
        raise ConfigError(f"model.init: card {source!r} has no weights")
    return uri, models.read_checkpoint(uri, cfg.data.storage_options)


def init_model(cfg: ExperimentConfig) -> tuple[LoadedModel, str | None]:
    """The freshly built model, with ``model.init`` weights loaded strictly; and their sha256."""
    model = models.build(cfg.model.arch, cfg.model.config, task=cfg.task)
    model.normalise_exposure = cfg.model.normalise_exposure
    if not cfg.model.init:
        if cfg.optim.zero_init_last:  # start as the identity map: never below the input's quality
            torch.nn.init.zeros_(model.module.conv_out.weight)
        return model, None
    uri, ckpt = initial_weights(cfg)
    load_weights(model.module, ckpt.state_dict, uri, cfg.model.arch, cfg.model.config)
    return model, ckpt.sha256


class Trainer:
    """One worker's training run: built (and resumed) on construction, trained by :meth:`run`."""

    def __init__(self, cfg: ExperimentConfig, options: RunOptions, ctx: WorkerContext) -> None:
        self.cfg, self.options, self.ctx = cfg, options, ctx
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
        if ctx.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed patch size: pick the fastest convolution kernels once
        self.total = cfg.train.steps
        self.stop_at = min(options.stop_after or self.total, self.total)
        torch.manual_seed(cfg.train.seed)
        self.model, _ = init_model(cfg)
        o = cfg.optim
        self.optimizer = torch.optim.Adam(self.model.module.parameters(), lr=o.lr, betas=tuple(o.betas))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_at(s, cfg) / o.lr)
        self.store = RunStore(cfg)
        self.step, self.history, self.started, self.elapsed_before = 0, [], time.time(), 0.0
        self._resume()
        self.network = ctx.prepare_model(self.model.module)  # what the steps run (DDP across workers)
        d = cfg.data
        self.sampler = PatchSampler(ctx.pairs, d.patch, Degradation.from_config(d.degradation) if d.degradation
                                    else None, d.mixup, sources=parse_sources(d.train.clean),
                                    normalise_exposure=cfg.model.normalise_exposure)
        self.val_pairs = load_validation(cfg) if ctx.rank == 0 else []
        self.per_worker = cfg.train.batch_size // ctx.world

    def _resume(self) -> None:
        """Continue from the run's latest checkpoint, if there is one."""
        state = self.store.latest()
        if state is None:
            return
        load_weights(self.model.module, state["model"], self.store.url, self.cfg.model.arch, self.cfg.model.config)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.history = int(state["step"]), json.loads(state["history"])
        self.elapsed_before = float(state.get("wall_seconds", 0.0))

    @property
    def wall_seconds(self) -> float:
        """Training time of the run so far, over all its launches."""
        return self.elapsed_before + time.time() - self.started

    def draw(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """The (degraded, clean) patches of ``step``: the same for a step, resumed or not."""
        return self.sampler.batch(self.per_worker, np.random.default_rng([self.cfg.train.seed, self.ctx.rank, step]))

    def run(self) -> None:
        """Train to ``train.steps`` (or the launch's ``stop_after``); export the model when done."""
        cfg, ctx, stop_at = self.cfg, self.ctx, self.stop_at
        running: list[torch.Tensor] = []
        ahead = max(1, int(cfg.scaling.cpus_per_worker) - 1)  # batches drawn in threads while steps train
        with ThreadPoolExecutor(max_workers=ahead) as prefetch:
            queued = collections.deque(prefetch.submit(self.draw, s)
                                       for s in range(self.step, min(self.step + ahead, stop_at)))
            while self.step < stop_at:
                inp, tgt = (torch.from_numpy(a).to(ctx.device, non_blocking=True) for a in queued.popleft().result())
                if self.step + ahead < stop_at:
                    queued.append(prefetch.submit(self.draw, self.step + ahead))
                loss, lr = self._train_step(inp, tgt)
                self.step += 1
                running.append(loss)  # read back only when logged: no GPU sync per step
                record: dict[str, Any] = {}
                if self.step % cfg.train.log_every == 0 or self.step == stop_at:
                    record = {"step": self.step, "loss": float(torch.stack(running).mean()), "lr": lr}
                    running = []
                if self.val_pairs and (self.step % cfg.validate.every == 0 or self.step == self.total):
                    keep = functools.partial(self.store.save_validation_crops, self.step)
                    record = {"step": self.step, "lr": lr, **record,
                              **validate(self.model, self.val_pairs, cfg, ctx.device, keep)}
                if record and ctx.rank == 0:
                    self.history.append(record)
                if self.step % cfg.checkpoint.every == 0 or self.step == stop_at:
                    self._checkpoint()
                if record:
                    ctx.report({k: v for k, v in record.items() if isinstance(v, (int, float))})
        if ctx.rank == 0 and self.step == self.total:
            export(self.model, cfg, self.options, self.history, self.wall_seconds, self.store)

    def _train_step(self, inp: torch.Tensor, tgt: torch.Tensor) -> tuple[torch.Tensor, float]:
        """One optimizer step; the (detached) loss and the learning rate it used."""
        o = self.cfg.optim
        loss = charbonnier(self.network(inp), tgt, o.charbonnier_eps)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if o.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.module.parameters(), o.grad_clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        return loss.detach(), lr

    def _checkpoint(self) -> None:
        """Rank 0 writes the checkpoint and the metrics files; every worker waits for it."""
        if self.ctx.rank == 0:
            self.store.save_checkpoint({
                "model": unique_state_dict(self.model.module), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "step": self.step,
                "config": json.dumps(self.cfg.public_dict()), "history": json.dumps(self.history),
                "wall_seconds": self.wall_seconds})
            self.store.save_metrics(self.history)
        if self.ctx.world > 1:
            torch.distributed.barrier()


def hardware() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def export(model: LoadedModel, cfg: ExperimentConfig, options: RunOptions, history: list[dict[str, Any]],
           wall_seconds: float, store: RunStore) -> str:
    """Write model.safetensors and card.json into the run folder; return where the model went."""
    last_val = next((r for r in reversed(history) if "val_psnr" in r), {})
    plain = cfg.to_dict()
    recipe: dict[str, Any] = {
        "steps": cfg.train.steps, "batch_size": cfg.train.batch_size, "patch": cfg.data.patch, "optim": plain["optim"],
        "data": {k: plain["data"][k] for k in ("train", "val", "degradation", "mixup")},
        "seed": cfg.train.seed, "workers": cfg.scaling.num_workers, "hardware": hardware(),
        "wall_seconds": round(wall_seconds, 1)}
    if cfg.model.init:
        recipe["init"] = {"weights": options.init_as_given, "sha256": options.init_sha256}
    metadata = {"name": cfg.name, "task": cfg.task, "scale": cfg.scale, "recipe": recipe,
                "validation": {k: v for k, v in last_val.items() if k.startswith("val_")},
                "normalise_exposure": cfg.model.normalise_exposure}
    data = to_bytes(model.module, cfg.model.arch, cfg.model.config, **metadata)
    store.storage.write("model.safetensors", data)
    card = models.ModelCard(name=cfg.name, arch=cfg.model.arch, config=cfg.model.config, task=cfg.task,
                            scale=cfg.scale, weights="model.safetensors", sha256=sha256_hex(data),
                            recipe=recipe, metrics=metadata["validation"],
                            normalise_exposure=cfg.model.normalise_exposure, **cfg.card)
    store.storage.write("card.json", json.dumps(card.to_json(), indent=1).encode())
    return store.storage.display("model.safetensors")
