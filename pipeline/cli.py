"""The ``mirnet`` command line.

Start-up stays light: torch, Ray and the codecs are imported inside the commands, so
``mirnet --help`` answers at once.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
import traceback
from typing import TYPE_CHECKING, Any, Callable, NoReturn

import click

from models.errors import UsageError
from models.tasks import TASKS

from .formats import FORMAT_BY_NAME

if TYPE_CHECKING:  # the heavy modules load inside the commands
    from .codecs import FormatOptions
    from models import LoadedModel
    from .graph import ClusterOptions, ReplicaPool
    from .plan import Plan
    from .stages import JobSpec

EXIT_USAGE, EXIT_BUG, EXIT_STORAGE, EXIT_BUSY = 2, 3, 4, 5
# the user's own filesystem refusing a path they gave: a usage error, like the project's refusals
PATH_ERRORS = (FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError)


def is_storage_error(exc: BaseException) -> bool:
    """A failure to reach storage (network, endpoint, credentials), as opposed to a bad request."""
    from .storage import StorageError

    module = type(exc).__module__.split(".")[0]
    return isinstance(exc, (StorageError, ConnectionError, TimeoutError)) or module in (
        "botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "adlfs")


def _fail(error: BaseException | str, code: int = EXIT_USAGE, prefix: str | None = None) -> NoReturn:
    from .redact import redact

    message = redact(str(error.args[0] if isinstance(error, KeyError) and error.args else error))
    prefix = prefix or {EXIT_STORAGE: "storage error", EXIT_BUSY: "busy"}.get(code, "error")
    click.echo(f"{prefix}: {' '.join(str(message).split())}", err=True)
    sys.exit(code)


def _fail_usage(error: BaseException | str) -> NoReturn:
    _fail(error, EXIT_USAGE)


def exit_status(exc: BaseException) -> int:
    """The exit status of a command that raised ``exc``: 5 busy, 4 storage unreachable, 2 usage, 3 a bug."""
    from .lease import DestinationBusy, LeaseLost

    if isinstance(exc, (DestinationBusy, LeaseLost)):
        return EXIT_BUSY
    if is_storage_error(exc):  # before usage: StorageError is a UsageError too
        return EXIT_STORAGE
    return EXIT_USAGE if isinstance(exc, (UsageError, *PATH_ERRORS)) else EXIT_BUG


class Main(click.Group):
    """The ``mirnet`` group: the one place where a command's exception becomes an exit status.

    click's own errors and ``sys.exit`` pass through; anything that is neither a refusal
    (:class:`models.errors.UsageError`, a path the filesystem refuses), storage nor a busy
    destination is a bug: exit 3 with one line, and with ``mirnet -v`` the traceback.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            ray_errors = sys.modules.get("ray.exceptions")  # a refusal raised inside a Ray task counts as one
            cause = exc.cause if ray_errors and isinstance(exc, ray_errors.RayTaskError) and isinstance(
                exc.cause, Exception) else exc
            code = exit_status(cause)
            if code != EXIT_BUG:
                _fail(cause, code)
            from .redact import redact

            verbose = bool(ctx.params.get("verbose"))
            if verbose:
                click.echo(redact("".join(traceback.format_exception(exc))).rstrip(), err=True)
            hint = "the traceback is above" if verbose else "run with -v for the traceback"
            _fail(f"{type(exc).__name__}: {exc} (a bug: {hint})", EXIT_BUG, prefix="internal error")


def _json_option(value: str | None, what: str) -> dict[str, Any]:
    if not value:
        return {}
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"{what} must be a JSON object: {exc}") from exc
    if not isinstance(parsed, dict):
        raise click.BadParameter(f"{what} must be a JSON object")
    return parsed


@click.group(cls=Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log progress details (and a bug's traceback).")
def main(verbose: bool) -> None:
    """Restore images with MIRNet / MIRNet-v2, from a laptop to a Ray cluster."""
    from .redact import install

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")
    install()  # credentials never reach a log line or a traceback


@main.command()
@click.argument("src")
@click.argument("dst")
@click.option("--task", type=click.Choice(TASKS), help="What to restore.")
@click.option("--model", help="Model card name, or checkpoint path/URL (default: the task's shipped model).")
@click.option("--scale", type=click.Choice(["2", "3", "4"]), help="Super-resolution factor (task sr).")
@click.option("--format", "out_format", type=click.Choice(list(FORMAT_BY_NAME)),
              help="Output format (default: as input, or DST's extension for a single file).")
@click.option("--tile", type=int, help="Tile size in pixels (default: from free device memory; 512 on CPU).")
@click.option("--overlap", type=int, default=32, show_default=True, help="Tile overlap in pixels.")
@click.option("--batch-size", type=int, help="Tiles per model call (default: 1 on CPU, 8 on CUDA).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="auto: bf16 autocast where the model allows and the device does bf16 natively (CUDA, "
                   "AVX512-BF16/AMX CPUs), else fp32.")
@click.option("--device", help="torch device for in-process runs (default: cuda if available).")
@click.option("--tta", is_flag=True, help="x8 self-ensemble (flips and quarter turns): about +0.1 dB, eight "
                                         "times the time.")
@click.option("--compile/--no-compile", "compile_model", default=None,
              help="torch.compile the model: a minute or more per tile shape, then 1.6-2x the eager speed. Default: "
                   "when each replica has at least 100 images (CPU) or 2000 (GPU) (README, 'Engine').")
@click.option("--address", help="Ray cluster address ('auto' or host:port); default RAY_ADDRESS, else embedded.")
@click.option("--num-gpus", type=click.IntRange(min=0), help="GPU replicas (default: every GPU; 0 for CPU replicas).")
@click.option("--replicas", type=click.IntRange(min=1), help="CPU replicas (default: CPUs / cpus-per-replica).")
@click.option("--cpus-per-replica", type=click.IntRange(min=1), help="Torch threads per CPU replica (default 1, or 4 on >4 CPUs).")
@click.option("--images-per-batch", type=click.IntRange(min=1),
              help="Images per replica call; their tiles share device batches (default: 4 on GPUs, 1 on CPUs).")
@click.option("--num-cpus", type=click.IntRange(min=1), help="CPUs of the embedded Ray runtime (default: all).")
@click.option("--runtime-env", help="JSON Ray runtime env for the workers; the storage credentials of this "
                                    "shell are merged into it (its own env_vars win).")
@click.option("--include", multiple=True, help="Glob of keys to take (repeatable; default: image extensions, "
                                                     "unsupported ones such as .gif becoming failed rows).")
@click.option("--exclude", multiple=True, help="Glob of keys to leave out (repeatable).")
@click.option("--keys-from", help="Text or Parquet file of keys relative to SRC, instead of listing.")
@click.option("--storage-options", help="JSON of fsspec options (overrides the environment).")
@click.option("--overwrite", is_flag=True, help="Redo inputs that already have an ok output.")
@click.option("--dry-run", is_flag=True, help="List what would be done and exit.")
@click.option("--fail-fast", is_flag=True, help="Stop at the first failed image.")
@click.option("--quiet", is_flag=True, help="No progress bar (for scheduled jobs).")
@click.option("--executor", type=click.Choice(["auto", "ray", "inline"]), default="auto", show_default=True,
              help="auto: Ray for a cluster address or a big job, else in-process (README, 'Small jobs').")
@click.option("--max-pixels", type=int, help="Refuse (as a failed row) an image with more pixels than this, "
                                             "from its header, before decoding (default 2e9: a 40000x40000 scene "
                                             "passes).")
@click.option("--allow-empty", is_flag=True, help="An empty source is not an error (scheduled jobs).")
@click.option("--report", "make_report", is_flag=True,
              help="At the end, write an HTML report of the run to DST/_manifest/report-RUN.html and print its path.")
@click.option("--bands", help="GeoTIFF: 1-based bands to restore, e.g. 4,3,2 (three go together through a colour "
                              "model; otherwise band by band); the others are copied (default: all, band by band).")
@click.option("--scale-range", help="GeoTIFF: LO,HI stored values mapped to the model's 0..1 (default: per-band "
                                    "1st..99th percentiles; 0,255 for 8-bit).")
@click.option("--stac", is_flag=True, help="GeoTIFF: write a STAC item (NAME.stac.json) beside each output.")
@click.option("--slice-axis", type=click.IntRange(0, 2), default=2, show_default=True,
              help="NIfTI: restore volumes slice by slice across this voxel axis.")
def restore(src: str, dst: str, task: str | None, model: str | None, scale: str | None, out_format: str | None,
            tile: int | None, overlap: int, batch_size: int | None, precision: str, device: str | None,
            tta: bool, compile_model: bool | None,
            address: str | None, num_gpus: int | None, replicas: int | None, cpus_per_replica: int | None,
            images_per_batch: int | None, num_cpus: int | None, runtime_env: str | None, include: tuple[str, ...],
            exclude: tuple[str, ...],
            keys_from: str | None, storage_options: str | None, overwrite: bool, dry_run: bool,
            fail_fast: bool, quiet: bool, executor: str, max_pixels: int | None, allow_empty: bool,
            make_report: bool, bands: str | None, scale_range: str | None, stac: bool, slice_axis: int) -> None:
    """Restore SRC (a file, folder or prefix; local or fsspec URL) into DST.

    Exit status: 0 all images restored, 1 some failed, 2 usage error, 3 internal error (a bug),
    4 storage unreachable, 5 DST busy (another run holds its lease).
    """
    options = _json_option(storage_options, "--storage-options")
    fmt = FORMAT_BY_NAME.get(out_format or "")
    scale_n = int(scale) if scale else None
    if task == "sr" and scale_n is None and model is None:
        scale_n = 2
    if scale_n and task not in (None, "sr"):
        _fail_usage("--scale goes with --task sr")
    if max_pixels is not None and max_pixels < 1:
        _fail_usage("--max-pixels must be a positive number of pixels")
    say = (lambda text: None) if quiet else (lambda text: click.echo(text, err=True))
    formats = _format_options(bands, scale_range, stac, slice_axis)
    from .engine import EngineSettings
    from .graph import ClusterOptions
    from .runner import EarlyReplicas, prepare_job

    settings = EngineSettings(tile=tile, overlap=overlap, batch_size=batch_size, precision=precision,  # type: ignore[arg-type]
                              device=device, scale=scale_n, compile=compile_model, tta=tta)
    cluster = ClusterOptions(address=address, num_gpus=num_gpus, replicas=replicas, cpus_per_replica=cpus_per_replica,
                             images_per_batch=images_per_batch, num_cpus=num_cpus,
                             runtime_env=_json_option(runtime_env, "--runtime-env") or None, quiet=quiet)
    early = EarlyReplicas.for_job(executor, cluster, dry_run)
    say(f"listing {src} ..." if early is None else f"listing {src}, starting Ray and the replicas meanwhile ...")
    try:
        plan, spec, resolved = prepare_job(src, dst, model=model, task=task, scale=scale_n, settings=settings,
                                           out_format=fmt, storage_options=options, include=include,
                                           exclude=exclude, keys_from=keys_from, overwrite=overwrite,
                                           allow_empty=allow_empty, max_pixels=max_pixels, dry_run=dry_run,
                                           while_listing=early)
        spec = dataclasses.replace(spec, formats=formats)
        try:
            _run_planned(plan, spec, resolved, executor=executor, address=address, dry_run=dry_run,
                         fail_fast=fail_fast, quiet=quiet, say=say, make_report=make_report, cluster=cluster,
                         pool=early and early.pool)
        finally:
            plan.release()
    finally:  # the replicas of a run that failed before or while it ran (closing twice is harmless)
        if early is not None:
            early.close()


def _format_options(bands: str | None, scale_range: str | None, stac: bool, slice_axis: int) -> FormatOptions:
    """--bands, --scale-range, --stac and --slice-axis, checked (a bad value is a usage error)."""
    from .codecs import FormatOptions

    try:
        band_list = tuple(int(b) for b in bands.split(",")) if bands else None
        limits = tuple(float(v) for v in scale_range.split(",")) if scale_range else None
    except ValueError:
        _fail_usage("--bands takes band numbers (4,3,2) and --scale-range two numbers (LO,HI)")
    if band_list is not None and (min(band_list) < 1 or len(set(band_list)) != len(band_list)):
        _fail_usage("--bands takes distinct band numbers from 1")
    if limits is not None and (len(limits) != 2 or not limits[0] < limits[1]):
        _fail_usage("--scale-range takes LO,HI with LO < HI")
    return FormatOptions(band_list, limits, stac, slice_axis)  # type: ignore[arg-type]


def _run_planned(plan: Plan, spec: JobSpec, resolved: LoadedModel, *, executor: str, address: str | None,
                 dry_run: bool, fail_fast: bool, quiet: bool, say: Callable[[str], None],
                 cluster: ClusterOptions, make_report: bool = False, pool: ReplicaPool | None = None) -> None:
    """The second half of ``restore``: print a dry run's plan, or execute it and exit with its status."""
    from .runner import choose_executor, execute, summary

    if dry_run:
        for item in plan.runnable:
            click.echo(f"restore {plan.source.display(item.key)} -> {plan.output.display(item.output_key)}")
        for item in plan.refused:
            click.echo(f"fail    {plan.source.display(item.key)}: {item.error}")
        for item in plan.skipped:
            click.echo(f"skip    {plan.source.display(item.key)} (output exists with an ok manifest row)")
        click.echo(f"{len(plan.runnable)} to restore ({plan.retried} retried after failure), "
                   f"{len(plan.refused)} refused, {len(plan.skipped)} skipped; model {resolved.name} "
                   f"({resolved.task}{f' x{resolved.scale}' if resolved.task == 'sr' else ''})", err=True)
        return
    chosen, why = choose_executor(plan, executor, address, spec.max_pixels)
    if chosen == "inline" and executor == "auto" and len(plan.runnable) > 1:
        say(why)
    result = execute(plan, spec, executor=chosen, cluster=cluster, fail_fast=fail_fast, quiet=quiet,
                     model=resolved, pool=pool)
    click.echo(summary(result, plan), err=True)
    if make_report:
        _report_after_run(plan, result.run_id)
    sys.exit(result.exit_code)


def _report_after_run(plan: Plan, run_id: str) -> None:
    """``restore --report``: write the run's report and print its path; a failure to do so leaves the exit status."""
    from .report import write_report

    try:
        click.echo(write_report(plan.output, plan.source, run_id=run_id))
    except Exception as exc:
        from .redact import redact

        click.echo(f"report not written: {redact(f'{type(exc).__name__}: {exc}')}", err=True)


@main.command("report")
@click.argument("dst")
@click.option("--src", help="The run's SRC (the manifest keys are relative to it): the gallery's 'before' "
                            "images. Required, except with --train.")
@click.option("--sample", type=click.IntRange(min=0), default=24, show_default=True,
              help="Before/after pairs in the gallery (a deterministic sample of the ok images).")
@click.option("--out", help="Where to write the page (path or URL; default DST/_manifest/report-RUN.html).")
@click.option("--truth", help="Ground-truth prefix (same relative keys as SRC): PSNR/SSIM of the sampled images.")
@click.option("--run", "run_id", help="The run to report (default: the latest in DST).")
@click.option("--storage-options", help="JSON of fsspec options (overrides the environment).")
@click.option("--train", "training", is_flag=True,
              help="DST is a training run folder (CHECKPOINT_DIR/NAME): write its training report (default "
                   "DST/report.html). Takes only --out and --storage-options.")
@click.pass_context
def report(ctx: click.Context, dst: str, src: str | None, sample: int, out: str | None, truth: str | None,
           run_id: str | None, storage_options: str | None, training: bool) -> None:
    """Write one self-contained HTML page about a restore run into DST: summary, failures, timing, gallery.

    With --train, DST is a training run folder instead: loss, learning-rate and PSNR curves,
    validation table and crops. Prints where the page went. Exit status: 0 written, 2 no such
    run (or run folder, or metrics in it), 4 storage unreachable.
    """
    from click.core import ParameterSource

    from .report import write_report, write_training_report
    from .storage import Storage

    options = _json_option(storage_options, "--storage-options")
    if training:
        extra = [flag for flag, given in (("--src", src), ("--truth", truth), ("--run", run_id), (
            "--sample", ctx.get_parameter_source("sample") == ParameterSource.COMMANDLINE)) if given]
        if extra:
            _fail_usage(f"--train reports a training run folder; {', '.join(extra)} belong to restore runs")
    elif src is None:
        raise click.UsageError("Missing option '--src' (or --train for a training run folder).", ctx)
    if training:
        where = write_training_report(Storage(dst, options), out=out, options=options)
    else:
        where = write_report(Storage(dst, options), Storage(src, options), out=out, options=options,
                             run_id=run_id, sample=sample, truth=Storage(truth, options) if truth else None)
    click.echo(where)


@main.group("manifest")
def manifest_group() -> None:
    """Maintain a destination's manifest."""


@manifest_group.command("compact")
@click.argument("dst")
@click.option("--storage-options", help="JSON of fsspec options (overrides the environment).")
def compact_manifest(dst: str, storage_options: str | None) -> None:
    """Merge every manifest part under DST/_manifest/ into one (finished runs already leave one part each).

    Useful after runs that were killed, or for manifests written before runs compacted
    themselves. Safe while nothing writes into DST: the merged part is written before the
    small ones are removed.
    """
    from .manifest import MANIFEST_DIR, compact
    from .storage import Storage

    merged, rows = compact(Storage(dst, _json_option(storage_options, "--storage-options")), MANIFEST_DIR)
    click.echo(f"merged {merged} part(s), {rows} rows" if merged > 1 else "nothing to merge", err=True)


@main.group("models", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print the cards as JSON.")
@click.pass_context
def list_models(ctx: click.Context, as_json: bool) -> None:
    """List the registered model cards (weights: yes, no, or 'pull' for an official checkpoint not yet cached)."""
    if ctx.invoked_subcommand is not None:
        return
    import models

    cards = models.list_cards()
    if as_json:
        click.echo(json.dumps([c.to_json() for c in cards], indent=2))
        return
    click.echo(f"{'name':<32} {'arch':<10} {'task':<8} {'scale':>5} {'weights':<8} {'default':<7} summary")
    for c in cards:
        weights = "yes" if c.has_weights else ("pull" if c.source is not None else "no")
        click.echo(f"{c.name:<32} {c.arch:<10} {c.task:<8} {c.scale:>5} {weights:<8} "
                   f"{'yes' if c.default else '':<7} {c.summary}")
        for metric, value in c.metrics.items():
            click.echo(f"{'':<24}   {metric}: {value}")


@list_models.command("pull")
@click.argument("name")
@click.option("--from", "origin", help="Take the file from this URL or path (a mirror, a manual download).")
@click.option("--sha256", help="The sha256 the file must have (pinned for every later load).")
@click.option("--force", is_flag=True, help="Download again, replacing the cached file and its pinned sha256.")
def pull_model(name: str, origin: str | None, sha256: str | None, force: bool) -> None:
    """Download an official checkpoint card's weights into the cache, verified (see `mirnet models`).

    Sources: the authors' published link, or MIRNET_WEIGHTS_MIRROR (a folder URL holding the
    files by name), or --from. The cache is MIRNET_CACHE (default ~/.cache/mirnet).
    """
    import models
    from models.official import pull

    card = models.lookup(name)
    if card is None:
        _fail_usage(f"no model card named {name!r}; known: {', '.join(sorted(c.name for c in models.list_cards()))}")
    path = pull(card, origin=origin, sha256=sha256, force=force, say=lambda text: click.echo(text, err=True))
    click.echo(str(path))


@main.command()
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("--resume", is_flag=True, help="Require a checkpoint to resume from (a rerun resumes anyway).")
@click.option("--restart", is_flag=True, help="Delete the run's checkpoints and start from step 0.")
@click.option("--address", help="Ray cluster address (default RAY_ADDRESS, else embedded).")
@click.option("--num-workers", type=click.IntRange(min=1), help="Override scaling.num_workers.")
@click.option("--use-gpu/--no-gpu", default=None, help="Override scaling.use_gpu.")
@click.option("--checkpoint-dir", help="Override checkpoint.dir: where runs go (a folder or URL, e.g. s3://models/runs).")
@click.option("--stop-after", type=click.IntRange(min=1), help="Stop (with a checkpoint) after this many steps in total.")
@click.option("--executor", type=click.Choice(["ray", "inline"]), default="ray", show_default=True,
              help="ray: Ray Train workers (DDP); inline: one worker in this process, without Ray.")
def train(config: str, resume: bool, restart: bool, address: str | None, num_workers: int | None,
          use_gpu: bool | None, checkpoint_dir: str | None, stop_after: int | None, executor: str) -> None:
    """Train the experiment in CONFIG (YAML); reruns resume from the latest checkpoint."""
    from .training.config import load_config
    from .training.launch import run_training

    scaling = {k: v for k, v in (("num_workers", num_workers), ("use_gpu", use_gpu)) if v is not None}
    overrides: dict[str, Any] = {"scaling": scaling} if scaling else {}
    if checkpoint_dir:
        overrides["checkpoint"] = {"dir": checkpoint_dir}
    with open(config) as f:
        cfg = load_config(f.read(), overrides or None)
    if resume and restart:
        _fail_usage("--resume and --restart exclude each other")
    result = run_training(cfg, resume=resume, restart=restart, address=address, stop_after=stop_after,
                          executor=executor)
    last = next((r for r in reversed(result["history"]) if "val_psnr" in r), {})
    click.echo(f"run {result['run']}: step {result['step']} (resumed from step {result['resumed_from']})")
    if last:
        click.echo(f"validation at step {last['step']}: PSNR {last['val_psnr']:.2f} dB "
                   f"(input {last['val_input_psnr']:.2f} dB), SSIM {last['val_ssim']:.4f}")


@main.command("eval")
@click.option("--model", "model_name", required=True, help="Model card name or checkpoint path/URL.")
@click.option("--input", "input_url", required=True, help="Degraded image file or folder.")
@click.option("--target", "target_url", required=True, help="Clean image file or folder (matching keys).")
@click.option("--task", type=click.Choice(TASKS), help="Task, if not recorded.")
@click.option("--json", "json_out", default="eval.json", show_default=True, help="Where to write the results.")
@click.option("--tile", type=int, help="Tile size (default: automatic).")
@click.option("--overlap", type=int, default=32, show_default=True, help="Tile overlap in pixels.")
@click.option("--storage-options", help="JSON of fsspec options.")
@click.option("--report", "report_out", help="Also write an HTML report here (path or URL): per-image table and "
                                             "before/after/target gallery.")
def evaluate(model_name: str, input_url: str, target_url: str, task: str | None, json_out: str,
             tile: int | None, overlap: int, storage_options: str | None, report_out: str | None) -> None:
    """Print per-image and mean PSNR/SSIM of MODEL's restorations against clean targets."""
    from .evaluate import evaluate_folder
    from .report import eval_pair, render_eval_html, write_page

    options = _json_option(storage_options, "--storage-options")
    pairs: list[Any] = []
    report = evaluate_folder(model_name, input_url, target_url, task=task, tile=tile, overlap=overlap,
                             storage_options=options,
                             on_image=(lambda *images: pairs.append(eval_pair(*images))) if report_out else None)
    for row in report["images"]:
        click.echo(f"{row['key']:<40} PSNR {row['psnr']:.2f} dB  SSIM {row['ssim']:.4f}  "
                   f"(input {row['input_psnr']:.2f} dB / {row['input_ssim']:.4f})")
    m = report["mean"]
    click.echo(f"{'mean':<40} PSNR {m['psnr']:.2f} dB  SSIM {m['ssim']:.4f}  "
               f"(input {m['input_psnr']:.2f} dB / {m['input_ssim']:.4f})")
    with open(json_out, "w") as f:  # the scores first: a report that cannot be written loses nothing else
        json.dump(report, f, indent=1)
    click.echo(f"wrote {json_out}", err=True)
    if report_out:
        written = write_page(render_eval_html(report, pairs, input_url, target_url), report_out, options)
        click.echo(f"wrote {written}", err=True)



@main.group("jobs")
def jobs_group() -> None:
    """Submit, watch and schedule job specs (jobs/*.yaml) on a Ray cluster, or render them for KubeRay."""


_address_option = click.option("--address", help="Ray dashboard address, e.g. http://head:8265 "
                                                 "(default RAY_ADDRESS, else a cluster on this machine).")
_set_option = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                           help="Override a spec field, e.g. params.SRC=s3://bucket/scans (repeatable).")


def _jobs_call(action: Callable[[], Any]) -> Any:
    """Run a Jobs API action; say which failures are the cluster's (4) or a refused token (2).

    A bad spec or an unknown job id is a UsageError (2) for :class:`Main`, like the rest.
    """
    from .submit import ClusterUnreachable

    try:
        return action()
    except ClusterUnreachable as exc:
        _fail(exc, EXIT_STORAGE, prefix="cluster unreachable")
    except Exception as exc:
        if type(exc).__name__ == "AuthenticationError" or "authentication" in str(exc).lower():
            _fail(f"the cluster refused the request: {exc} (token authentication needs RAY_AUTH_MODE=token "
                  "and the cluster's token in ~/.ray/auth_token or RAY_AUTH_TOKEN)")
        if isinstance(exc, RuntimeError) and "Request failed with status code" in str(exc):
            _fail(exc, EXIT_STORAGE, prefix="cluster error")  # the Jobs API answered with a server error
        raise


@jobs_group.command("submit")
@click.argument("spec", type=click.Path(dir_okay=False))
@_address_option
@_set_option
@click.option("--at", "at", type=click.DateTime(formats=["%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d"]),
              help="Submit as if at this UTC time: a scheduled spec's missed period can be run late.")
@click.option("--wait", is_flag=True, help="Stream the job's log and wait for it; exit 0 only if it SUCCEEDED.")
@click.option("--dry-run", is_flag=True, help="Print the Jobs API request (JSON) and submit nothing.")
def jobs_submit(spec: str, address: str | None, overrides: tuple[str, ...], at: Any, wait: bool,
                dry_run: bool) -> None:
    """Submit SPEC to the cluster, once per schedule period for a scheduled spec."""
    from . import submit as jobs
    from .jobspec import load_spec

    job = _jobs_call(lambda: load_spec(spec, list(overrides)))
    if dry_run:
        click.echo(json.dumps(_jobs_call(lambda: job.submit_kwargs(at)), indent=2))
        return
    client = _jobs_call(lambda: jobs.connect(address))
    done = _jobs_call(lambda: jobs.submit(client, job, at))
    verb = "submitted" if done.created else "already submitted for this period"
    click.echo(f"{verb}: {done.job_id} ({done.status})")
    if wait:
        if done.status not in jobs.TERMINAL:
            _jobs_call(lambda: jobs.follow_logs(client, done.job_id, lambda text: click.echo(text, nl=False)))
        status = _jobs_call(lambda: jobs.wait(client, done.job_id))
        click.echo(f"{done.job_id}: {status}")
        sys.exit(0 if status == "SUCCEEDED" else 1)


@jobs_group.command("status")
@click.argument("job_id")
@_address_option
@click.option("--json", "as_json", is_flag=True, help="Print the job's details as JSON.")
def jobs_status(job_id: str, address: str | None, as_json: bool) -> None:
    """Print a job's status (and, with --json, its entrypoint, times, metadata and message)."""
    from . import submit as jobs

    details = _jobs_call(lambda: jobs.job_details(jobs.connect(address), job_id))
    if as_json:
        click.echo(json.dumps(details, indent=2))
    else:
        message = f"  {details['message']}" if details["message"] else ""
        click.echo(f"{job_id}: {details['status']}{message}")


@jobs_group.command("logs")
@click.argument("job_id")
@_address_option
@click.option("--follow", "-f", is_flag=True, help="Keep streaming until the job ends.")
def jobs_logs(job_id: str, address: str | None, follow: bool) -> None:
    """Print a job's log (its driver's stdout and stderr)."""
    from . import submit as jobs

    client = _jobs_call(lambda: jobs.connect(address))
    if follow:
        _jobs_call(lambda: jobs.follow_logs(client, job_id, lambda text: click.echo(text, nl=False)))
    else:
        _jobs_call(lambda: jobs.job_status(client, job_id))
        click.echo(_jobs_call(lambda: client.get_job_logs(job_id)), nl=False)


@jobs_group.command("list")
@_address_option
@click.option("--json", "as_json", is_flag=True, help="Print the jobs as JSON.")
def jobs_list(address: str | None, as_json: bool) -> None:
    """List the cluster's jobs, newest first."""
    from datetime import datetime, timezone

    from . import submit as jobs

    rows = _jobs_call(lambda: jobs.job_rows(jobs.connect(address)))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        started = (datetime.fromtimestamp(row["start_time"] / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M")
                   if row["start_time"] else "-")
        click.echo(f"{row['id']:40} {row['status']:10} {started:16} {row['entrypoint'][:60]}")


@jobs_group.command("stop")
@click.argument("job_id")
@_address_option
def jobs_stop(job_id: str, address: str | None) -> None:
    """Ask a running job to stop (its run releases the destination's lease as it ends)."""
    from . import submit as jobs

    client = _jobs_call(lambda: jobs.connect(address))
    _jobs_call(lambda: jobs.job_status(client, job_id))
    stopped = _jobs_call(lambda: client.stop_job(job_id))
    click.echo(f"{job_id}: {'stop requested' if stopped else 'already finished'}")


@jobs_group.command("render")
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--kuberay", is_flag=True, required=True, help="Render a KubeRay manifest (the only target).")
@click.option("--kind", type=click.Choice(["RayJob", "RayCronJob", "RayCluster"]),
              help="Default: RayCronJob for a scheduled spec, else RayJob. RayCluster: a long-lived cluster "
                   "to submit to.")
@_set_option
@click.option("-o", "--out", type=click.Path(dir_okay=False), help="Write here instead of to stdout.")
def jobs_render(spec: str, kuberay: bool, kind: str | None, overrides: tuple[str, ...], out: str | None) -> None:
    """Write SPEC as a KubeRay RayJob (or RayCronJob, RayCluster) manifest for kubectl apply."""
    from .jobspec import load_spec
    from .kuberay import render_yaml

    text = _jobs_call(lambda: render_yaml(load_spec(spec, list(overrides)), kind))
    if out:
        with open(out, "w") as f:
            f.write(text)
        click.echo(f"wrote {out}", err=True)
    else:
        click.echo(text, nl=False)


if __name__ == "__main__":  # last: every command group above is registered by now
    main()
