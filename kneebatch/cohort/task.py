"""The worker task of a cohort run: one subject under its claim, from inputs to the files of
``OUT/subjects/<id>/``; it never raises for a bad subject, it reports an outcome."""

from __future__ import annotations

import logging
import time
import traceback
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from kneebatch import __version__
from kneebatch.cohort.outcome import SubjectOutcome
from kneebatch.config import READ_TIMEOUT_S, ExtractionConfig
from kneebatch.errors import KneebatchError, MemoryLimitError
from kneebatch.extract.memory import estimate_bytes, gib
from kneebatch.extract.pipeline import Stage, SubjectResult, forward_subject, prepare_subject
from kneebatch.inputs.manifest import SubjectSpec
from kneebatch.network.cache import get_model
from kneebatch.network.model import LoadedModel
from kneebatch.network.options import FAST, ForwardOptions, check_precision
from kneebatch.network.provenance import model_info
from kneebatch.outdir.claims import claim
from kneebatch.outdir.key import subject_key
from kneebatch.outdir.records import DoneRecord, RegionRecord, parse_dataclass
from kneebatch.report.qc_picture import qc_title, render_qc
from kneebatch.results.subject_files import QC, State, remove_result, result_state, write_subject
from kneebatch.runtime import SUBJECTS_IN_PROGRESS
from kneebatch.scan.headers import check_headers

log = logging.getLogger(__name__)


def _done_record(spec: SubjectSpec, result: SubjectResult, config: ExtractionConfig,
                 model: LoadedModel, key: str, run_id: str,
                 options: ForwardOptions) -> DoneRecord:
    import torch

    return DoneRecord(
        subject_id=result.subject_id,
        key=key,
        config_hash=config.hash(),
        config=config.to_dict(),
        model_sha256=model.info.sha256,
        weights=model.info.weights,
        run_id=run_id,
        versions={"kneebatch": __version__, "torch": torch.__version__,
                  "torchvision": metadata.version("torchvision")},
        side=result.side,
        ct=str(spec.ct),
        mask=str(spec.mask),
        extra=dict(spec.extra),
        labels=str(spec.labels),
        bilateral=spec.bilateral,
        regions={name: parse_dataclass(RegionRecord, stats.to_dict())
                 for name, stats in result.region_stats.items()},
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
                    subject_timeout_s: float | None = None,
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
        subject_timeout_s: a subject still computing after this long fails (``timeout``; checked
            between stages, see ``Stage``).
        options: the forward pass's fast-path switches (recorded in ``done.json``).

    Returns:
        The outcome; for ``failed``, the error message and the stage it happened in.
    """
    stage = Stage("model", subject_timeout_s, spec.subject_id)
    start = time.perf_counter()
    try:
        info = model_info(model_path)  # the key needs the file's sha256, not the network
        key = subject_key(spec, config.hash(), info.sha256)
        with claim(out, spec.subject_id, run_id) as held:
            if not held:
                return SubjectOutcome(spec.subject_id, "claimed")
            if not overwrite and result_state(out, spec.subject_id, key) is State.FINISHED:
                return SubjectOutcome(spec.subject_id, "skipped")
            with stage("write"):
                remove_result(out, spec.subject_id)
            if memory_limit_bytes:
                with stage("memory"):
                    check_memory(spec, config, memory_limit_bytes, read_timeout_s)
            check_precision(config.precision)  # refuse bf16 on this CPU before reading anything
            with SUBJECTS_IN_PROGRESS.hold():
                prepared = prepare_subject(spec, config, stage=stage,
                                           read_timeout_s=read_timeout_s)
                qc_png = None
                if qc:
                    with stage("qc"):
                        qc_png = render_qc(prepared.regions, qc_title(
                            spec.subject_id, spec.side, prepared.regions.spacing_mm, info.weights))
                with stage("model"):  # loaded once per process, after the first one's read
                    model = get_model(model_path, config.input_norm, config.conv_padding)
                result = forward_subject(spec, prepared, config, model, stage=stage,
                                         options=options)
            with stage("write"):
                done = _done_record(spec, result, config, model, key, run_id, options)
                extra = {QC: qc_png} if qc_png else {}
                timings = write_subject(out, spec.subject_id, result.vectors, result.rows, done,
                                        start, extra)
    except KneebatchError as exc:
        log.error("Subject %s failed at %s: %s", spec.subject_id, exc.stage, exc.message)
        log.debug("Subject %s: traceback", spec.subject_id, exc_info=True)
        return SubjectOutcome(spec.subject_id, "failed", exc.message, exc.stage)
    except Exception as exc:  # one subject's surprise must not stop the cohort
        log.error("Subject %s failed at %s with an unexpected error:\n%s", spec.subject_id,
                  stage.current, traceback.format_exc())
        message = (f"Subject {spec.subject_id}: unexpected {type(exc).__name__}: {exc}. This is "
                   "probably a kneebatch bug; please report it with the log.")
        return SubjectOutcome(spec.subject_id, "failed", message, stage.current, internal=True)
    log.info("Subject %s finished in %.1f s", spec.subject_id, timings["total"])
    return SubjectOutcome(spec.subject_id, "finished", timings_s=timings)
