"""Extraction of one knee, in memory: CT + mask -> regions -> network -> vectors -> similarities.

A pure function of (spec, config, loaded model): no files written, no dask, no globals, so
``kneebatch extract``, the Python API and the cohort's worker task (``cohort/task.py``) run the same
code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator

import numpy as np

from kneebatch.config import READ_TIMEOUT_S, REGIONS, ExtractionConfig
from kneebatch.errors import SubjectTimeoutError
from kneebatch.extract.similarity import similarities
from kneebatch.inputs.manifest import SubjectSpec
from kneebatch.network.features import extract_features
from kneebatch.network.model import LoadedModel
from kneebatch.network.options import FAST, ForwardOptions, check_precision, compute_dtype
from kneebatch.runtime import release_memory
from kneebatch.scan.read import load_scan
from kneebatch.scan.region_stats import RegionStats, region_stats
from kneebatch.scan.regions import Regions, make_regions
from kneebatch.schema import SimilarityRow

log = logging.getLogger(__name__)

# A region at least this large (native resolution; 1 mm regions have under 6M voxels) has the
# pages the previous region's forward kept returned to the kernel first (0.1 GiB less at seed
# semantics' peak); a smaller one's forward reuses them: 16% faster than faulting them in anew.
RELEASE_FROM_VOXELS = 8_000_000


class Stage:
    """The stage a subject is in, kept after an error so its failure report can name it, and its
    time limit.

    ``with stage("read"): ...`` marks a stage; the last one entered stays current. With a
    ``limit_s``, entering a stage after that many seconds (counted from the ``Stage``'s creation)
    raises ``SubjectTimeoutError``: the limit is checked between stages, so a stage that is
    already running finishes first.
    """

    def __init__(self, name: str = "model", limit_s: float | None = None,
                 subject_id: str = "") -> None:
        self.current = name
        self.limit_s = limit_s
        self.subject_id = subject_id
        self.started = time.monotonic()

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        elapsed = time.monotonic() - self.started
        if self.limit_s is not None and elapsed > self.limit_s:
            raise SubjectTimeoutError(
                f"Subject {self.subject_id}: still computing after {elapsed:.3g} s, over the "
                f"--subject-timeout of {self.limit_s:g} s (stopped after stage {self.current}, "
                f"before {name}). Look at its inputs' size and spacing (kneebatch validate), or "
                "raise --subject-timeout.")
        self.current = name
        yield


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
    warnings: tuple[str, ...] = ()
    region_stats: dict[str, RegionStats] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Prepared:
    """One knee read, checked and split, ready for the network (``prepare_subject``)."""

    regions: Regions
    timings_s: dict[str, float]
    warnings: tuple[str, ...]
    region_stats: dict[str, RegionStats]


def prepare_subject(spec: SubjectSpec, config: ExtractionConfig, *, stage: Stage,
                    read_timeout_s: float = READ_TIMEOUT_S) -> Prepared:
    """Read, check and split one knee (no model needed: a worker does this for its next subject
    while the current one runs through the network). Arguments as ``compute_subject``."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    with stage("read"):
        scan = load_scan(spec, config, read_timeout_s)
    timings["read"] = time.perf_counter() - start
    start = time.perf_counter()
    with stage("preprocess"):
        regions = make_regions(scan, config)
    timings["preprocess"] = time.perf_counter() - start
    start = time.perf_counter()
    with stage("preprocess"):
        stats = region_stats(scan, regions)
    warnings = scan.warnings
    del scan
    timings["region_stats"] = time.perf_counter() - start
    return Prepared(regions, timings, warnings, stats)


def forward_subject(spec: SubjectSpec, prepared: Prepared, config: ExtractionConfig,
                    model: LoadedModel, *, stage: Stage,
                    options: ForwardOptions = FAST) -> SubjectResult:
    """Run a prepared knee's three regions through the network (one forward pass at a time per
    process: ``model.forward_lock``) and compare them."""
    dtype = compute_dtype(config.precision)
    regions, timings = prepared.regions, dict(prepared.timings_s)
    vectors = {}
    shapes = {}
    with model.forward_lock:
        for region in REGIONS:
            with stage(f"forward.{region}"):
                volume, members = regions.region(region)  # one region at a time: peak memory
                if volume.size >= RELEASE_FROM_VOXELS:
                    release_memory()
                shapes[region] = tuple(volume.shape)
                held = [volume]  # handed over: the network frees it once it is past the stem
                del volume
                vectors[region], timings[f"forward.{region}"] = extract_features(
                    model.network, held, config.layers, options, dtype=dtype,
                    region=members if config.pooling == "region" else None)
            del members
            log.debug("Subject %s: %s %s in %.2f s", spec.subject_id, region, shapes[region],
                      timings[f"forward.{region}"])
    with stage("similarity"):  # also the time limit's check after the last region
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
        warnings=prepared.warnings,
        region_stats=prepared.region_stats,
    )


def compute_subject(spec: SubjectSpec, config: ExtractionConfig, model: LoadedModel, *,
                    stage: Stage | None = None,
                    read_timeout_s: float = READ_TIMEOUT_S,
                    options: ForwardOptions = FAST) -> SubjectResult:
    """Read, split, run and compare one knee, in memory.

    Args:
        spec: the subject.
        config: extraction settings.
        model: the loaded 3D network.
        stage: kept set to the running stage (for failure reports).
        read_timeout_s: a file that gives no answer for this long fails the subject.
        options: the forward pass's fast-path switches.

    Raises:
        KneebatchError: bad input (file, geometry, labels), or a precision this CPU lacks.
    """
    track = stage or Stage()
    check_precision(config.precision)  # refuse bf16 on this CPU before reading anything
    prepared = prepare_subject(spec, config, stage=track,
                               read_timeout_s=read_timeout_s)
    return forward_subject(spec, prepared, config, model, stage=track, options=options)
