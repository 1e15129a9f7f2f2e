"""Training with the papers' recipe on Ray Train (DDP; gloo on the CPU, NCCL on GPUs),
or inline: one worker in this process, on one GPU or the CPU, without Ray.

Defaults follow MIRNet: Charbonnier loss (eps 1e-3), Adam (lr 2e-4, betas 0.9/0.999),
a linear warm-up then cosine annealing to 1e-6, 128x128 patches, batch 16. One
addition: the output convolution starts at zero (``optim.zero_init_last``), so the
network starts as the identity map of its global skip and validation never starts
below the degraded input; set it to false for the papers' initialisation.
``model.init`` (a card name or a checkpoint path/URL) fine-tunes existing weights instead.

Checkpoints (model, optimizer, scheduler, step, config, metric history) are written
every ``checkpoint.every`` steps under ``CHECKPOINT_DIR/RUN_NAME/checkpoints/`` on any
fsspec URL. A rerun with the same run name resumes from the latest one (same step,
same learning rate, same data stream: patches are drawn from an RNG seeded by
(seed, rank, step)); a worker failure restarts the workers, which resume the same way.
"""
from __future__ import annotations

import collections
import copy
import csv
import functools
import io
import json
import math
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import yaml

import models
from models.cards import ModelCard

from . import data as train_data
from .degrade import Degradation
from .metrics import score
from .storage import Storage, safe_relative_key

EXECUTORS = ("ray", "inline")
DEFAULTS: dict[str, Any] = {
    "name": None,
    "task": "denoise",
    "scale": 1,
    "model": {"arch": "mirnet_v2", "config": {}, "init": None},  # init: card name or checkpoint to fine-tune
    "data": {
        "train": {"clean": None, "degraded": None},
        "val": {"clean": None, "degraded": None},
        "degradation": None,  # e.g. {kind: gaussian, sigma: [0, 50]}; None for paired data
        "val_degradation": None,  # default: the training degradation
        "patch": 128,
        "mixup": False,
        "storage_options": {},
    },
    "optim": {"lr": 2e-4, "betas": [0.9, 0.999], "min_lr": 1e-6, "warmup_steps": None, "charbonnier_eps": 1e-3,
              "grad_clip": None, "zero_init_last": True},
    "train": {"steps": 1000, "batch_size": 16, "seed": 0, "log_every": 10},
    "checkpoint": {"dir": "runs", "every": 100},
    "validate": {"every": 100, "crop": 256},
    "scaling": {"num_workers": 1, "use_gpu": False, "cpus_per_worker": 1},
    "failure": {"max_failures": 2},
    "card": {},  # extra model-card fields for the exported model (summary, bf16_safe, ...)
}


def _merge(base: dict[str, Any], override: dict[str, Any], path: str = "") -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if key not in base:
            raise ValueError(f"unknown config key {path + key!r}")
        if isinstance(base[key], dict) and isinstance(value, dict) and key not in ("config", "card", "storage_options"):
            out[key] = _merge(base[key], value, f"{path}{key}.")
        else:
            out[key] = value
    return out


def load_config(text_or_dict: str | dict[str, Any], overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Parse and complete an experiment config (YAML text or a dict).

    ``overrides`` (the command line's, same shape as the config) are applied before the
    config is validated, so they are checked like the file's own values.
    """
    raw = yaml.safe_load(text_or_dict) if isinstance(text_or_dict, str) else text_or_dict
    if not isinstance(raw, dict):
        raise ValueError("a training config must be a YAML mapping")
    cfg = _merge(_merge(DEFAULTS, raw), overrides or {})
    if not cfg["name"]:
        raise ValueError("config needs a run 'name'")
    safe_relative_key(cfg["name"])
    if not cfg["data"]["train"]["clean"]:
        raise ValueError("config needs data.train.clean")
    if cfg["data"]["degradation"] is None and not cfg["data"]["train"]["degraded"]:
        raise ValueError("config needs data.degradation for unpaired (clean-only) training data")
    train_data.parse_sources(cfg["data"]["train"]["clean"], paired=bool(cfg["data"]["train"]["degraded"]))
    if cfg["train"]["steps"] < 1:
        raise ValueError("train.steps must be at least 1")
    batch, workers = cfg["train"]["batch_size"], cfg["scaling"]["num_workers"]
    if workers < 1 or batch % workers:
        raise ValueError(f"train.batch_size {batch} must be divisible by scaling.num_workers {workers} "
                         "(each worker takes an equal share of the batch)")
    if cfg["optim"]["warmup_steps"] is None:
        cfg["optim"]["warmup_steps"] = max(1, cfg["train"]["steps"] // 50)
    models.build(cfg["model"]["arch"], **cfg["model"]["config"])  # fail early on a bad model config
    return cfg


def _absolute(url: str | None) -> str | None:
    """Local relative paths made absolute: Ray workers run in other folders."""
    if not url or "://" in url:
        return url
    return os.path.abspath(url)


def absolutise_paths(cfg: dict[str, Any]) -> dict[str, Any]:
    cfg = copy.deepcopy(cfg)
    cfg["checkpoint"]["dir"] = _absolute(cfg["checkpoint"]["dir"])
    if models.lookup(cfg["model"]["init"]) is None:
        cfg["model"]["init"] = _absolute(cfg["model"]["init"])
    for split in ("train", "val"):
        for kind in ("clean", "degraded"):
            cfg["data"][split][kind] = train_data.map_urls(cfg["data"][split][kind], _absolute)
    return cfg


def lr_at(step: int, cfg: dict[str, Any]) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up, then cosine to min_lr."""
    o, total = cfg["optim"], cfg["train"]["steps"]
    warm = o["warmup_steps"]
    if step < warm:
        return o["lr"] * (step + 1) / warm
    progress = min((step - warm) / max(total - warm, 1), 1.0)
    return o["min_lr"] + (o["lr"] - o["min_lr"]) * 0.5 * (1 + math.cos(math.pi * progress))


def charbonnier(pred: torch.Tensor, target: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.sqrt((pred - target) ** 2 + eps * eps).mean()


class RunStore:
    """Files of one run on any fsspec URL: checkpoints, metrics, plot, report, validation crops, exported model."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.storage = Storage(f"{cfg['checkpoint']['dir'].rstrip('/')}/{cfg['name']}",
                               cfg["data"]["storage_options"])
        self.url = self.storage.url
        self.cfg = cfg

    def checkpoints(self) -> list[str]:
        try:
            return sorted(k for k in self.storage.list(include=["checkpoints/step-*.pt"]))
        except FileNotFoundError:
            return []

    def latest(self) -> dict[str, Any] | None:
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

    def save_validation_crops(self, step: int, key: str, degraded: np.ndarray, restored: np.ndarray,
                              clean: np.ndarray) -> None:
        """Small 1:1 crops of one validation image at ``step``, for the training report (``val/``).

        Like the report, the crops are for people: a failure to make or store them is
        printed and training goes on."""
        from .report import validation_crop_files

        try:
            for name, data in validation_crop_files(step, key, degraded, restored, clean).items():
                self.storage.write(name, data)
        except Exception as exc:
            report_failed("validation crops", exc)

    def public_config(self) -> dict[str, Any]:
        """The run's config without storage options (they may hold credentials) or internal keys."""
        cfg = {k: v for k, v in self.cfg.items() if not k.startswith("_")}
        return dict(cfg, data={k: v for k, v in cfg["data"].items() if k != "storage_options"})

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
        config = self.public_config()
        self.storage.write("config.json", json.dumps(config, indent=1).encode())
        from .report import write_training_report

        try:
            write_training_report(self.storage, history=history, config=config)
        except Exception as exc:  # the report is for people; it never stops the training
            report_failed("training report", exc)


def report_failed(what: str, exc: BaseException) -> None:
    """Say that a part of the training report was not written (credentials masked)."""
    from .redact import redact

    print(redact(f"{what} not written: {type(exc).__name__}: {exc}"), file=sys.stderr, flush=True)


def plot_history(history: list[dict[str, Any]]) -> bytes:
    """PNG of training loss and validation PSNR over steps."""
    from .report import draw_loss, draw_psnr, figure_data, new_figure

    figure = new_figure((10, 3.6), 2)
    draw_loss(figure.axes[0], history)
    draw_psnr(figure.axes[1], history)
    return figure_data(figure)


def restore_float(model: torch.nn.Module, img: np.ndarray, multiple: int, device: torch.device) -> np.ndarray:
    """Whole-image inference for validation: reflect-pad, run, crop, quantise to 8 bits."""
    x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None].to(device)
    h, w = x.shape[-2:]
    x = torch.nn.functional.pad(x, (0, (-w) % multiple, 0, (-h) % multiple), mode="reflect")
    with torch.no_grad():
        y = model(x)[..., :h, :w].clamp(0, 1)
    return np.rint(y[0].permute(1, 2, 0).cpu().numpy() * 255) / 255


def validate(model: torch.nn.Module, pairs: list[tuple[str, np.ndarray, np.ndarray]], cfg: dict[str, Any],
             device: torch.device,
             keep: Callable[[str, np.ndarray, np.ndarray, np.ndarray], None] | None = None) -> dict[str, float]:
    """Mean PSNR/SSIM (RGB and Y) of restored and degraded validation images.

    ``keep(key, degraded, restored, clean)``, when given, sees every image (the report's crops).
    """
    multiple = getattr(model, "size_multiple", 4)
    border = cfg["scale"] if cfg["task"] == "sr" else 0
    was_training = model.training
    model.eval()
    restored, inputs = [], []
    for key, degraded, clean in pairs:
        output = restore_float(model, degraded, multiple, device)
        restored.append(score(output, clean, border))
        inputs.append(score(np.rint(degraded * 255) / 255, clean, border))
        if keep is not None:
            keep(key, degraded, output, clean)
    model.train(was_training)
    out = {f"val_{k}": float(np.mean([s.as_dict()[k] for s in restored])) for k in ("psnr", "ssim", "psnr_y", "ssim_y")}
    out.update({f"val_input_{k}": float(np.mean([s.as_dict()[k] for s in inputs])) for k in ("psnr", "ssim")})
    return out


def _center_crop(img: np.ndarray, size: int | None) -> np.ndarray:
    if not size:
        return img
    h, w = img.shape[:2]
    y, x = max((h - size) // 2, 0), max((w - size) // 2, 0)
    return img[y:y + size, x:x + size]


def load_validation(cfg: dict[str, Any]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    d = cfg["data"]
    if not d["val"]["clean"]:
        return []
    options = d["storage_options"]
    pairs = [train_data.load_pair(d["val"]["clean"], d["val"]["degraded"], k, options)
             for k in train_data.list_keys(d["val"]["clean"], options)]
    crop = cfg["validate"]["crop"]
    multiple = cfg["scale"] if cfg["task"] == "sr" else 1
    pairs = [train_data.Pair(p.key, _center_crop(p.clean, crop), None if p.degraded is None
                             else _center_crop(p.degraded, crop)) for p in pairs]
    if multiple > 1:  # SR ground truth must divide by the scale
        pairs = [train_data.Pair(p.key, p.clean[:p.clean.shape[0] // multiple * multiple,
                                          :p.clean.shape[1] // multiple * multiple], p.degraded) for p in pairs]
    degradation = d["val_degradation"] or d["degradation"]
    return train_data.validation_pairs(pairs, Degradation.from_config(degradation) if degradation else None,
                                       cfg["train"]["seed"] + 1000)


def initial_weights(cfg: dict[str, Any]) -> tuple[str, models.checkpoints.Checkpoint]:
    """Read the checkpoint named by ``model.init`` (a card name or a path/URL)."""
    source = cfg["model"]["init"]
    card = models.lookup(source)
    uri = source if card is None else card.weights_uri
    if uri is None:
        raise ValueError(f"model.init: card {source!r} has no weights")
    return uri, models.read_checkpoint(uri, cfg["data"]["storage_options"])


def init_model(cfg: dict[str, Any]) -> tuple[torch.nn.Module, str | None]:
    """The freshly built model, with ``model.init`` weights loaded strictly; and their sha256."""
    model = models.build(cfg["model"]["arch"], **cfg["model"]["config"])
    if not cfg["model"]["init"]:
        if cfg["optim"]["zero_init_last"]:  # start as the identity map: never below the input's quality
            torch.nn.init.zeros_(model.conv_out.weight)
        return model, None
    uri, ckpt = initial_weights(cfg)
    models.checkpoints.load_weights(model, ckpt.state_dict, uri, cfg["model"]["arch"], cfg["model"]["config"])
    return model, ckpt.sha256


@dataclass
class WorkerContext:
    """Where the training loop runs: a Ray Train worker, or this process (the inline executor)."""

    rank: int
    world: int
    device: torch.device
    pairs: list[train_data.Pair]
    prepare_model: Callable[[torch.nn.Module], torch.nn.Module]  # to the device (and DDP across workers)
    report: Callable[[dict[str, Any]], None]


def ray_worker_context(photos: bool = True) -> WorkerContext:
    """The context of a Ray Train worker: its rank, device and shard of the training images
    (none without ``photos``: synthetic sources only)."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    pairs = train_data.pairs_from_rows(list(ray.train.get_dataset_shard("train").iter_rows())) if photos else []
    return WorkerContext(ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device(), pairs,
                         ray.train.torch.prepare_model, ray.train.report)


def inline_context(cfg: dict[str, Any]) -> WorkerContext:
    """One worker in this process, without Ray: reads the training images itself."""
    s, d = cfg["scaling"], cfg["data"]
    if s["num_workers"] != 1:
        raise ValueError(f"the inline executor trains one worker; scaling.num_workers is {s['num_workers']}")
    if s["use_gpu"] and not torch.cuda.is_available():
        raise ValueError("scaling.use_gpu is set, but torch sees no CUDA GPU on this machine")
    device = torch.device("cuda" if s["use_gpu"] else "cpu")
    pairs = train_data.load_training_pairs(d["train"]["clean"], d["train"]["degraded"], d["storage_options"])

    def report(record: dict[str, Any]) -> None:
        print(" ".join(f"{k} {v:.5g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()),
              file=sys.stderr, flush=True)

    return WorkerContext(0, 1, device, pairs, lambda model: model.to(device), report)


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    """Ray Train's entry point on each worker."""
    train_worker(cfg, ray_worker_context(photos=train_data.has_photos(cfg["data"]["train"]["clean"])))


def train_worker(cfg: dict[str, Any], ctx: WorkerContext) -> None:
    """The training loop of one worker: resume, step, validate, checkpoint, export."""
    rank, world, device = ctx.rank, ctx.world, ctx.device
    torch.set_num_threads(max(1, int(cfg["scaling"]["cpus_per_worker"])))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed patch size: pick the fastest convolution kernels once
    seed, total = cfg["train"]["seed"], cfg["train"]["steps"]
    stop_at = min(cfg.get("_stop_after") or total, total)
    torch.manual_seed(seed)
    model, _ = init_model(cfg)
    o = cfg["optim"]
    optimizer = torch.optim.Adam(model.parameters(), lr=o["lr"], betas=tuple(o["betas"]))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, cfg) / o["lr"])
    store = RunStore(cfg)
    state = store.latest()
    step, history, started = 0, [], time.time()
    elapsed_before = 0.0
    if state is not None:
        models.checkpoints.load_weights(model, state["model"], store.url, cfg["model"]["arch"], cfg["model"]["config"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, history = int(state["step"]), json.loads(state["history"])
        elapsed_before = float(state.get("wall_seconds", 0.0))
    ddp_model = ctx.prepare_model(model)
    d = cfg["data"]
    sampler = train_data.PatchSampler(ctx.pairs, d["patch"], Degradation.from_config(d["degradation"])
                                      if d["degradation"] else None, d["mixup"],
                                      sources=train_data.parse_sources(d["train"]["clean"]))
    val_pairs = load_validation(cfg) if rank == 0 else []
    per_worker = cfg["train"]["batch_size"] // world

    def draw(at_step: int) -> tuple[np.ndarray, np.ndarray]:  # the same patches for a step, resumed or not
        return sampler.batch(per_worker, np.random.default_rng([seed, rank, at_step]))

    running: list[torch.Tensor] = []
    ahead = max(1, int(cfg["scaling"]["cpus_per_worker"]) - 1)  # batches drawn in threads while steps train
    with ThreadPoolExecutor(max_workers=ahead) as prefetch:
        queued = collections.deque(prefetch.submit(draw, s) for s in range(step, min(step + ahead, stop_at)))
        while step < stop_at:
            inp, tgt = (torch.from_numpy(a).to(device, non_blocking=True) for a in queued.popleft().result())
            if step + ahead < stop_at:
                queued.append(prefetch.submit(draw, step + ahead))
            loss = charbonnier(ddp_model(inp), tgt, o["charbonnier_eps"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if o["grad_clip"]:
                torch.nn.utils.clip_grad_norm_(model.parameters(), o["grad_clip"])
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            step += 1
            running.append(loss.detach())  # read back only when logged: no GPU sync per step
            record: dict[str, Any] = {}
            if step % cfg["train"]["log_every"] == 0 or step == stop_at:
                record = {"step": step, "loss": float(torch.stack(running).mean()), "lr": lr}
                running = []
            if val_pairs and (step % cfg["validate"]["every"] == 0 or step == total):
                keep = functools.partial(store.save_validation_crops, step)
                record = {"step": step, "lr": lr, **record, **validate(model, val_pairs, cfg, device, keep)}
            if record and rank == 0:
                history.append(record)
            if step % cfg["checkpoint"]["every"] == 0 or step == stop_at:
                if rank == 0:
                    store.save_checkpoint({
                        "model": models.checkpoints.unique_state_dict(model), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "step": step, "config": json.dumps(cfg),
                        "history": json.dumps(history), "wall_seconds": elapsed_before + time.time() - started})
                    store.save_metrics(history)
                if world > 1:
                    torch.distributed.barrier()
            if record:
                ctx.report({k: v for k, v in record.items() if isinstance(v, (int, float))})
    if rank == 0 and step == total:
        export(model, cfg, history, elapsed_before + time.time() - started, store)


def hardware() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def export(model: torch.nn.Module, cfg: dict[str, Any], history: list[dict[str, Any]], wall_seconds: float,
           store: RunStore) -> str:
    """Write model.safetensors and card.json into the run folder."""
    last_val = next((r for r in reversed(history) if "val_psnr" in r), {})
    recipe = {"steps": cfg["train"]["steps"], "batch_size": cfg["train"]["batch_size"], "patch": cfg["data"]["patch"],
              "optim": cfg["optim"], "data": {k: cfg["data"][k] for k in ("train", "val", "degradation", "mixup")},
              "seed": cfg["train"]["seed"], "workers": cfg["scaling"]["num_workers"], "hardware": hardware(),
              "wall_seconds": round(wall_seconds, 1)}
    if cfg["model"]["init"]:
        recipe["init"] = {"weights": cfg["_init_as_given"], "sha256": cfg["_init_sha256"]}
    metadata = {"name": cfg["name"], "task": cfg["task"], "scale": cfg["scale"], "recipe": recipe,
                "validation": {k: v for k, v in last_val.items() if k.startswith("val_")}}
    data = models.checkpoints.to_bytes(model, cfg["model"]["arch"], cfg["model"]["config"], **metadata)
    store.storage.write("model.safetensors", data)
    card = ModelCard(name=cfg["name"], arch=cfg["model"]["arch"], config=cfg["model"]["config"], task=cfg["task"],
                     scale=cfg["scale"], size_multiple=int(getattr(model, "size_multiple", 4)),
                     weights="model.safetensors", sha256=models.checkpoints.sha256_hex(data),
                     recipe=recipe, metrics=metadata["validation"], **cfg["card"])
    store.storage.write("card.json", json.dumps(card.to_json(), indent=1).encode())
    return store.storage.display("model.safetensors")


def run_training(cfg: dict[str, Any], *, resume: bool = False, restart: bool = False, address: str | None = None,
                 stop_after: int | None = None, executor: str = "ray") -> dict[str, Any]:
    """Train (or resume) the run described by ``cfg``; returns a summary.

    ``executor``: "ray" runs ``scaling.num_workers`` Ray Train workers (DDP) on the embedded
    runtime or the cluster at ``address``; "inline" runs one worker in this process, without Ray.
    """
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; choose one of {', '.join(EXECUTORS)}")
    if executor == "inline" and address:
        raise ValueError("a cluster address needs the ray executor; the inline executor trains in this process")
    init_as_given = cfg["model"]["init"]  # recorded in the recipe as written, not as this machine's path
    cfg = absolutise_paths(cfg)
    store = RunStore(cfg)
    existing = store.checkpoints()
    if resume and not existing:
        raise ValueError(f"--resume: no checkpoint found under {store.url}/checkpoints/")
    if restart:
        for key in existing:
            store.storage.fs.rm(store.storage.path(key))
    _, init_sha256 = init_model(cfg)  # a bad model.init fails here, before any worker starts
    cfg = dict(cfg, _stop_after=stop_after, _init_sha256=init_sha256, _init_as_given=init_as_given)
    if executor == "inline":
        train_worker(cfg, inline_context(cfg))
    else:
        _fit_on_ray(cfg, address)
    state = store.latest()
    return {"run": store.url, "step": int(state["step"]) if state else 0,
            "resumed_from": int(existing[-1].rsplit("-", 1)[-1].split(".")[0]) if existing and not restart else 0,
            "history": json.loads(state["history"]) if state else []}


def _fit_on_ray(cfg: dict[str, Any], address: str | None) -> None:
    """Run the training loop on Ray Train workers, with the training images as a Ray Dataset."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from .graph import ClusterOptions, connect

    connect(ClusterOptions(address=address))
    d = cfg["data"]
    dataset = train_data.build_dataset(d["train"]["clean"], d["train"]["degraded"], d["storage_options"])
    s = cfg["scaling"]
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=cfg,
        scaling_config=ray.train.ScalingConfig(num_workers=s["num_workers"], use_gpu=s["use_gpu"],
                                               resources_per_worker={"CPU": s["cpus_per_worker"]}),
        run_config=ray.train.RunConfig(name=f"{cfg['name']}-{time.strftime('%Y%m%dT%H%M%S')}",
                                       failure_config=ray.train.FailureConfig(max_failures=cfg["failure"]["max_failures"]),
                                       storage_path=os.path.join(os.path.expanduser("~"), "ray_results")),
        datasets={"train": dataset} if dataset is not None else {})
    trainer.fit()
