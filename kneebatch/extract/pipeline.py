"""Subject stage: one knee from CT + mask to vectors, similarities and files.

``process_subject`` is a pure function of (spec, config, model file, output folder): no globals
besides the per-process model cache, no dask, so ``kneebatch extract``, a dask worker and a SLURM array
task all run the same code.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np

from kneebatch import __version__
from kneebatch.cohort.runtime import SUBJECTS_IN_PROGRESS, release_memory
from kneebatch.config import REGIONS, ExtractionConfig
from kneebatch.errors import KneebatchError, MemoryLimitError
from kneebatch.extract.memory import estimate_bytes, gib
from kneebatch.extract.similarity import SimilarityRow, similarities
from kneebatch.inputs.manifest import SubjectSpec
from kneebatch.network.features import extract_features
from kneebatch.network.model import LoadedModel, get_model, model_info
from kneebatch.network.options import FAST, ForwardOptions, compute_dtype
from kneebatch.outdir.claims import claim
from kneebatch.outdir.key import subject_key
from kneebatch.outdir.records import DoneRecord
from kneebatch.results.subject_files import QC, State, remove_result, result_state, write_subject
from kneebatch.scan.files import READ_TIMEOUT_S
from kneebatch.scan.headers import check_headers
from kneebatch.scan.read import load_scan
from kneebatch.scan.region_stats import RegionStats, region_stats
from kneebatch.scan.regions import Regions, make_regions

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SubjectResult:
    """One knee's features, in memory.

    Attributes:
        subject_id: the subject.
        vectors: region -> layer -> float32 vector.
        rows: cosine similarities, layer by layer, pairs in DESIGN.md's order.
        timings_s: seconds per stage (read, preprocess, forward.<region>, ...).
        shapes: region -> (z, y, x) shape fed to the network.
        boxes: region -> crop box on the resampled grid.
        spacing_mm: voxel size fed to the network (z, y, x).
        side: the knee's side as given.
        qc_png: the QC picture, when asked for.
        warnings: what the user should know about this subject's inputs.
        region_stats: region -> volume and HU statistics on the native grid.
    """

    subject_id: str
    vectors: dict[str, dict[str, np.ndarray]]
    rows: list[SimilarityRow]
    timings_s: dict[str, float]
    shapes: dict[str, tuple[int, ...]]
    boxes: dict[str, tuple[tuple[int, int], ...]]
    spacing_mm: tuple[float, float, float]
    side: str | None
    qc_png: bytes | None = None
    warnings: tuple[str, ...] = ()
    region_stats: dict[str, RegionStats] = dataclasses.field(default_factory=dict)


Status = Literal["finished", "failed", "claimed", "skipped"]


@dataclasses.dataclass(frozen=True)
class SubjectOutcome:
    """What a worker reports back for one subject (small; the data is on disk).

    Attributes:
        status: ``finished`` (computed now), ``failed``, ``claimed`` (another process holds the
            subject: nothing done) or ``skipped`` (another process finished it meanwhile).
    """

    subject_id: str
    status: Status
    error: str | None = None
    stage: str | None = None
    timings_s: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when the subject was computed now."""
        return self.status == "finished"


@dataclasses.dataclass(frozen=True)
class Prepared:
    """One knee read, checked and split, ready for the network (``prepare_subject``)."""

    regions: Regions
    timings_s: dict[str, float]
    warnings: tuple[str, ...]
    qc_png: bytes | None
    region_stats: dict[str, RegionStats]


def prepare_subject(spec: SubjectSpec, config: ExtractionConfig, *, stage: list[str],
                    qc: bool = False, weights: str = "",
                    read_timeout_s: float = READ_TIMEOUT_S) -> Prepared:
    """Read, check and split one knee (no model needed: a worker does this for its next subject
    while the current one runs through the network).

    Args:
        weights: the model's weights, for the QC picture's title.
        (others as ``compute_subject``)
    """
    timings: dict[str, float] = {}
    stage.append("read")
    start = time.perf_counter()
    scan = load_scan(spec, config, read_timeout_s)
    timings["read"] = time.perf_counter() - start
    stage.append("preprocess")
    start = time.perf_counter()
    regions = make_regions(scan, config)
    timings["preprocess"] = time.perf_counter() - start
    start = time.perf_counter()
    stats = region_stats(scan, regions)
    warnings = scan.warnings
    del scan
    timings["region_stats"] = time.perf_counter() - start
    qc_png = None
    if qc:
        stage.append("qc")
        from kneebatch.report.qc_picture import qc_title, render_qc

        qc_png = render_qc(regions, qc_title(spec.subject_id, spec.side, regions.spacing_mm,
                                             weights))
    return Prepared(regions, timings, warnings, qc_png, stats)


def forward_subject(spec: SubjectSpec, prepared: Prepared, config: ExtractionConfig,
                    model: LoadedModel, *, stage: list[str],
                    options: ForwardOptions = FAST) -> SubjectResult:
    """Run a prepared knee's three regions through the network (one forward pass at a time per
    process: ``model.forward_lock``) and compare them."""
    dtype = compute_dtype(config.precision)
    regions, timings = prepared.regions, dict(prepared.timings_s)
    vectors = {}
    shapes = {}
    with model.forward_lock:
        for region in REGIONS:
            stage.append(f"forward.{region}")
            release_memory()
            volume, members = regions.region(region)  # one region at a time: peak memory
            shapes[region] = tuple(volume.shape)
            vectors[region], timings[f"forward.{region}"] = extract_features(
                model.network, volume, config.layers, options, dtype=dtype,
                region=members if config.pooling == "region" else None)
            del volume, members
            log.debug("Subject %s: %s %s in %.2f s", spec.subject_id, region, shapes[region],
                      timings[f"forward.{region}"])
    stage.append("similarity")
    rows = similarities(spec.subject_id, vectors, config.layers)
    return SubjectResult(
        subject_id=spec.subject_id,
        vectors=vectors,
        rows=rows,
        timings_s=timings,
        shapes=shapes,
        boxes=regions.boxes,
        spacing_mm=regions.spacing_mm,
        side=spec.side,
        qc_png=prepared.qc_png,
        warnings=prepared.warnings,
        region_stats=prepared.region_stats,
    )


def compute_subject(spec: SubjectSpec, config: ExtractionConfig, model: LoadedModel, *,
                    stage: list[str] | None = None, qc: bool = False,
                    read_timeout_s: float = READ_TIMEOUT_S,
                    options: ForwardOptions = FAST) -> SubjectResult:
    """Read, split, run and compare one knee, in memory.

    Args:
        spec: the subject.
        config: extraction settings.
        model: the loaded 3D network.
        stage: if given, its last element is kept set to the running stage (for failure reports).
        qc: also render the QC picture of what the network is fed.
        read_timeout_s: a file that gives no answer for this long fails the subject.
        options: the forward pass's fast-path switches.

    Raises:
        KneebatchError: bad input (file, geometry, labels), or a precision this CPU lacks.
    """
    track = stage if stage is not None else []
    compute_dtype(config.precision)  # refuse bf16 on this CPU before reading anything
    prepared = prepare_subject(spec, config, stage=track, qc=qc, weights=model.info.weights,
                               read_timeout_s=read_timeout_s)
    return forward_subject(spec, prepared, config, model, stage=track, options=options)


def _done_record(spec: SubjectSpec, result: SubjectResult, config: ExtractionConfig,
                 model: LoadedModel, key: str, run_id: str,
                 options: ForwardOptions) -> DoneRecord:
    import torch
    import torchvision

    return DoneRecord(
        subject_id=result.subject_id,
        key=key,
        config_hash=config.hash(),
        config=config.to_dict(),
        model_sha256=model.info.sha256,
        weights=model.info.weights,
        run_id=run_id,
        versions={"kneebatch": __version__, "torch": torch.__version__,
                  "torchvision": torchvision.__version__},
        side=result.side,
        ct=str(spec.ct),
        mask=str(spec.mask),
        extra=dict(spec.extra),
        labels=str(spec.labels),
        bilateral=spec.bilateral,
        regions={name: stats.to_dict() for name, stats in result.region_stats.items()},
        spacing_mm=list(result.spacing_mm),
        shapes={r: list(s) for r, s in result.shapes.items()},
        boxes={r: [list(b) for b in box] for r, box in result.boxes.items()},
        timings_s={k: round(v, 4) for k, v in result.timings_s.items()},
        warnings=list(result.warnings),
        forward=options.to_dict(),
        finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def check_memory(spec: SubjectSpec, config: ExtractionConfig, limit_bytes: int,
                 read_timeout_s: float = READ_TIMEOUT_S) -> None:
    """Refuse a subject whose predicted peak memory exceeds ``limit_bytes`` (both headers only).

    Raises:
        MemoryLimitError: with both numbers and what to do.
        InputImageError: the headers cannot be read.
    """
    ct, mask = check_headers(spec, config, read_timeout_s)
    need = estimate_bytes(ct.size, ct.spacing, config, mask.size)
    if need > limit_bytes:
        raise MemoryLimitError(
            f"Subject {spec.subject_id}: CT {spec.ct} ({'x'.join(map(str, ct.size))} voxels) and "
            f"mask {spec.mask} ({'x'.join(map(str, mask.size))}) need about {gib(need)} but a "
            f"worker may use {gib(limit_bytes)}. Raise --memory-per-worker or the job's memory "
            "(sbatch --mem), use fewer --workers, or keep the default 1 mm spacing and crop."
        )


def process_subject(spec: SubjectSpec, config: ExtractionConfig, model_path: Path,
                    out: Path, *, run_id: str, memory_limit_bytes: int | None = None,
                    qc: bool = False, overwrite: bool = False,
                    read_timeout_s: float = READ_TIMEOUT_S,
                    options: ForwardOptions = FAST) -> SubjectOutcome:
    """Compute one subject and write ``OUT/subjects/<id>/``; never raises for a bad subject.

    Holds the subject's claim throughout, so no other process computes or writes it meanwhile.
    Under the claim, a result finished with the same key (by another run) is kept unless
    ``overwrite``; otherwise the previous result is removed before computing, so a subject that
    now fails has no result left.

    Args:
        spec: the subject.
        config: extraction settings.
        model_path: model file from ``kneebatch build-model`` (loaded once per process).
        out: the run's output folder.
        run_id: recorded in ``done.json`` as the run that computed the result.
        memory_limit_bytes: refuse the subject (stage ``memory``) if its predicted peak memory
            is larger.
        qc: also write ``qc.png``.
        overwrite: recompute even a finished result.
        read_timeout_s: a file that gives no answer for this long fails the subject (``read``).
        options: the forward pass's fast-path switches (recorded in ``done.json``).

    Returns:
        The outcome; for ``failed``, the error message and the stage it happened in.
    """
    stage = ["model"]
    start = time.perf_counter()
    try:
        info = model_info(model_path)  # the key needs the file's sha256, not the network
        key = subject_key(spec, config.hash(), info.sha256)
        with claim(out, spec.subject_id, run_id) as held:
            if not held:
                return SubjectOutcome(spec.subject_id, "claimed")
            if not overwrite and result_state(out, spec.subject_id, key) is State.FINISHED:
                return SubjectOutcome(spec.subject_id, "skipped")
            stage.append("write")
            remove_result(out, spec.subject_id)
            if memory_limit_bytes:
                stage.append("memory")
                check_memory(spec, config, memory_limit_bytes, read_timeout_s)
            compute_dtype(config.precision)  # refuse bf16 on this CPU before reading anything
            with SUBJECTS_IN_PROGRESS.hold():
                prepared = prepare_subject(spec, config, stage=stage, qc=qc,
                                           weights=info.weights, read_timeout_s=read_timeout_s)
                stage.append("model")  # loaded once per process, after the first one's read
                model = get_model(model_path, config.input_norm, config.conv_padding)
                result = forward_subject(spec, prepared, config, model, stage=stage,
                                         options=options)
            stage.append("write")
            done = _done_record(spec, result, config, model, key, run_id, options)
            extra = {QC: result.qc_png} if result.qc_png else {}
            timings = write_subject(out, spec.subject_id, result.vectors, result.rows, done,
                                    start, extra)
    except KneebatchError as exc:
        log.error("Subject %s failed at %s: %s", spec.subject_id, exc.stage, exc.message)
        log.debug("Subject %s: traceback", spec.subject_id, exc_info=True)
        return SubjectOutcome(spec.subject_id, "failed", exc.message, exc.stage)
    except Exception as exc:  # one subject's surprise must not stop the cohort
        log.error("Subject %s failed at %s with an unexpected error:\n%s", spec.subject_id,
                  stage[-1], traceback.format_exc())
        message = (f"Subject {spec.subject_id}: unexpected {type(exc).__name__}: {exc}. This is "
                   "probably a kneebatch bug; please report it with the log.")
        return SubjectOutcome(spec.subject_id, "failed", message, stage[-1])
    log.info("Subject %s finished in %.1f s", spec.subject_id, timings["total"])
    return SubjectOutcome(spec.subject_id, "finished", timings_s=timings)
