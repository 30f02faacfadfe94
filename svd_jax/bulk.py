"""Bulk generation, :func:`svd_jax.batch`: many videos from many images with one :class:`~svd_jax.Pipeline`,
resumable, over one or several processes.

Jobs come from a folder of images or a JSONL/CSV file (:func:`read_jobs`); each names its image, its output and
optionally its own seed and generation settings. Jobs with the same settings are generated together (a list of
images in one call, split across the local devices), so a batch costs one compilation per distinct setting.
Every video is written atomically (a temporary sibling renamed into place) with ``<output>.json`` beside it
holding its settings and seed, and an existing output is skipped: a crashed or interrupted run started again
loses at most the videos in flight. A job whose image cannot be read, or whose settings are refused, fails alone.

Several processes (one per host or per GPU, after ``jax.distributed.initialize()``) each take every
``process_count``-th job, starting at their own index: no job is done twice or left out, whatever the jobs'
order on disk, as long as every process reads the same jobs. Process 0 writes ``batch-summary.json`` with every
process's outcome once all are done.
"""

from __future__ import annotations

import csv
import dataclasses
import inspect
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence

import jax

from svd_jax import preprocess, processes, sharding, video
from svd_jax.loader import SVDModels
from svd_jax.pipeline import Pipeline
from svd_jax.progress import progress_bar
from svd_jax.store import remove_stale_scratch

__all__ = ["Job", "BatchSummary", "batch", "read_jobs", "process_share", "SETTING_NAMES", "SUMMARY_NAME"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SUMMARY_NAME = "batch-summary.json"
# What a job may set per video: the pipeline call's own arguments, less those that are arrays or callbacks
# (read from the signature, so a setting added to the pipeline is a job field at once).
_NOT_SETTINGS = {"self", "image", "seed", "latents", "noise", "output_type", "callback_on_step_end", "progress",
                 "sigmas"}
SETTING_NAMES = tuple(n for n in inspect.signature(Pipeline.__call__).parameters if n not in _NOT_SETTINGS)
_PATH_SETTINGS = ("last_image",)  # settings that name a file, relative to the jobs file like ``image``


@dataclasses.dataclass(frozen=True)
class Job:
    """One video: ``image`` (a path), ``output`` (a file name or path relative to the output folder; an
    extension of :data:`svd_jax.video.FILE_FORMATS` or none for a folder of PNG frames), its ``seed`` and the
    generation ``settings`` it sets itself (the others come from :func:`batch`'s keyword arguments)."""

    image: str
    output: str
    seed: int
    settings: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class BatchSummary:
    """What a batch did: the outputs written, those skipped because they existed, and those that failed with the
    reason (output name -> one line)."""

    done: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)

    def line(self) -> str:
        return f"{len(self.done)} done, {len(self.skipped)} skipped (already there), {len(self.failed)} failed"

    def merge(self, other: "BatchSummary") -> None:
        self.done += other.done
        self.skipped += other.skipped
        self.failed.update(other.failed)


def _number(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _rows(path: Path) -> list[dict]:
    if path.suffix.lower() == ".jsonl":
        rows = []
        for number, text in enumerate(path.read_text().splitlines(), 1):
            if text.strip():
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {number} is not JSON: {e.msg}") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path} line {number} is not a JSON object")
                rows.append(row)
        return rows
    with path.open(newline="") as f:  # CSV: a header row, then one job per row; empty cells are not given
        return [{k: _number(v.strip()) for k, v in row.items() if k and v and v.strip()} for row in csv.DictReader(f)]


def read_jobs(source, *, seed: int = 0, suffix: str = ".mp4") -> list[Job]:
    """The jobs of a folder of images (sorted by name; output ``<stem><suffix>``) or of a ``.jsonl`` / ``.csv``
    file with one job per line: ``image`` (relative paths are from the file's folder), optional ``output`` (else
    ``<stem><suffix>``), ``seed`` and any of :data:`SETTING_NAMES` (``num_frames``, ``motion_bucket_id``,
    ``fps``, ...). Job ``i`` without its own seed uses ``seed + i``. A malformed file, an unknown field or two jobs
    with one output is one clear error before anything runs."""
    source = Path(source)
    if source.is_dir():
        images = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        if not images:
            raise ValueError(f"{source} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        rows = [{"image": str(p)} for p in images]
        base = source
    elif source.suffix.lower() in (".jsonl", ".csv"):
        if not source.is_file():
            raise FileNotFoundError(f"jobs file {str(source)!r} does not exist")
        rows, base = _rows(source), source.parent
        if not rows:
            raise ValueError(f"jobs file {str(source)!r} holds no jobs")
    else:
        raise ValueError(f"jobs must be a folder of images or a .jsonl or .csv file, got {str(source)!r}")
    jobs, outputs = [], {}
    for index, row in enumerate(rows):
        where = f"{source} job {index + 1}"
        unknown = sorted(set(row) - {"image", "output", "seed", *SETTING_NAMES})
        if unknown:
            raise ValueError(f"{where}: unknown field {', '.join(map(repr, unknown))}; a job has image, output, seed "
                             f"and any of {', '.join(SETTING_NAMES)}")
        if not isinstance(row.get("image"), str) or not row["image"]:
            raise ValueError(f"{where} has no image")
        image = base / row["image"]
        output = str(row.get("output") or Path(row["image"]).stem + suffix)
        video.check_format(output)  # before any work
        if output in outputs:
            raise ValueError(f"{where} writes {output!r}, as job {outputs[output] + 1} does")
        outputs[output] = index
        job_seed = row.get("seed", seed + index)
        if isinstance(job_seed, bool) or not isinstance(job_seed, int):
            raise ValueError(f"{where}: seed must be an integer, got {job_seed!r}")
        settings = {k: v for k, v in row.items() if k in SETTING_NAMES}
        settings.update({k: str(base / settings[k]) for k in _PATH_SETTINGS if isinstance(settings.get(k), str)})
        jobs.append(Job(str(image), output, job_seed, settings))
    return jobs


def process_share(jobs: Sequence[Job], process_index: int, process_count: int) -> list[Job]:
    """This process's jobs: every ``process_count``-th from ``process_index`` (together: each job exactly once)."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process index {process_index} is not in [0, {process_count})")
    return list(jobs[process_index::process_count])


def _finished(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and any(path.iterdir()))


def _groups(jobs: Iterable[tuple[Job, object]], batch_size: int):
    """Jobs with identical settings, ``batch_size`` at a time, in the order their settings first appear."""
    groups: dict[str, list] = {}
    for job, image in jobs:
        groups.setdefault(json.dumps(job.settings, sort_keys=True), []).append((job, image))
    for members in groups.values():
        for start in range(0, len(members), batch_size):
            yield members[start:start + batch_size]


def _one_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _local_pipeline(models_or_pipeline) -> Pipeline:
    if isinstance(models_or_pipeline, Pipeline):
        return models_or_pipeline
    if not isinstance(models_or_pipeline, SVDModels):
        raise TypeError(f"batch needs SVDModels or a Pipeline, got {type(models_or_pipeline).__name__}")
    devices = jax.local_devices()
    return Pipeline(models_or_pipeline, sharding.make_mesh(devices) if len(devices) > 1 else None)


def batch(jobs: Sequence[Job] | str | os.PathLike, models_or_pipeline: SVDModels | Pipeline, out_dir, *,
          batch_size: int | None = None, seed: int = 0, suffix: str = ".mp4", record: dict | None = None,
          progress: bool = True, process_index: int | None = None, process_count: int | None = None,
          **settings) -> BatchSummary:
    """Generate every job's video into ``out_dir`` (created if missing) and return this process's summary.

    ``jobs``: a list of :class:`Job` or what :func:`read_jobs` reads (``seed`` and ``suffix`` are for it).
    ``models_or_pipeline``: loaded models (a pipeline over this process's devices is made) or a
    :class:`~svd_jax.Pipeline` to use as it is. ``settings``: generation settings for every job (a job's own
    win), as :func:`svd_jax.generate`'s. ``batch_size`` videos per call (default: one per local device).
    ``record``: extra entries for every sidecar JSON (e.g. the model's name). ``process_index`` /
    ``process_count`` default to JAX's; with several processes, process 0 also writes ``batch-summary.json``
    after all have finished (a barrier over all processes)."""
    jobs = read_jobs(jobs, seed=seed, suffix=suffix) if isinstance(jobs, (str, os.PathLike)) else list(jobs)
    unknown = sorted(set(settings) - set(SETTING_NAMES))
    if unknown:
        raise TypeError(f"batch got unknown settings {', '.join(unknown)}; known: {', '.join(SETTING_NAMES)}")
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    pipeline = _local_pipeline(models_or_pipeline)
    batch_size = batch_size or jax.local_device_count()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_scratch(out_dir)  # what killed runs left here
    summary, pending = BatchSummary(), []
    for job in process_share(jobs, index, count):
        target = out_dir / job.output
        if _finished(target):
            summary.skipped.append(job.output)
            if not target.with_name(target.name + ".json").exists():  # stopped between the video and its record
                video.write_settings(target, _record(job, settings, record))
            continue
        try:
            pending.append((job, preprocess.load_image(job.image)))
        except (OSError, ValueError) as e:  # a bad image fails its job, not the run
            summary.failed[job.output] = f"{job.image}: {_one_line(e)}"
    bar = progress_bar(total=len(pending), unit="video", disable=not progress, file=sys.stderr,
                       desc=f"process {index}/{count}" if count > 1 else "videos")
    with bar:
        for group in _groups(pending, batch_size):
            _generate_group(pipeline, group, out_dir, {**settings}, record, summary)
            bar.update(len(group))
    if count > 1:
        summary = _gather(summary, out_dir, index, count)
    if index == 0:
        video.write_settings(out_dir / SUMMARY_NAME[:-len(".json")], {**dataclasses.asdict(summary),
                                                                     "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return summary


def _record(job: Job, settings: dict, record: dict | None) -> dict:
    return {**(record or {}), "image": job.image, "seed": job.seed, **settings, **job.settings}


def _generate_group(pipeline: Pipeline, group: list, out_dir: Path, settings: dict, record, summary) -> None:
    jobs = [job for job, _ in group]
    options = {**settings, **jobs[0].settings}
    try:
        frames = pipeline([image for _, image in group], seed=[job.seed for job in jobs], output_type="uint8",
                          progress=False, **options)
    except (OSError, ValueError, TypeError, RuntimeError, MemoryError, FloatingPointError) as e:
        for job in jobs:  # settings the pipeline refuses fail their jobs, not the run
            summary.failed[job.output] = _one_line(e)
        return
    for job, frames_of_job in zip(jobs, frames):
        try:
            path = video.save_video(frames_of_job, out_dir / job.output, fps=options.get("fps", 7))
            video.write_settings(path, _record(job, settings, record))
            summary.done.append(job.output)
        except (OSError, ValueError, RuntimeError) as e:
            summary.failed[job.output] = _one_line(e)


def _gather(summary: BatchSummary, out_dir: Path, index: int, count: int) -> BatchSummary:
    """Every process's summary, for process 0 (others get their own back): each writes its part, all wait at
    a barrier, process 0 reads the parts."""
    part = out_dir / f".batch-summary.process-{index}"
    video.write_settings(part, dataclasses.asdict(summary))
    processes.wait_for_all("svd_jax.batch: all processes finished")
    if index != 0:
        return summary
    merged = BatchSummary()
    for i in range(count):
        path = out_dir / f".batch-summary.process-{i}.json"
        merged.merge(BatchSummary(**json.loads(path.read_text())))
        path.unlink()
    return merged
