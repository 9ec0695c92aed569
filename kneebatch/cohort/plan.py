"""``kneebatch run --dry-run``: what a run would do, and about how long and how much memory it would
take, without loading the model, starting a cluster or writing anything.

The estimate comes from the timings of results already in OUT (each ``done.json`` records its
subject's seconds; run records hold a run's wall time and task slots), else from a calibration
measured now: one subject read and preprocessed for real, and its three regions' network FLOPs
(counted on the ``meta`` device, no weights) at this machine's measured 3D-convolution rate.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path

from kneebatch.cohort.cluster import ClusterSpec, job_memory_bytes, layout
from kneebatch.cohort.run import RunOptions, shard
from kneebatch.errors import ConfigError, KneebatchError
from kneebatch.extract.memory import estimate_bytes
from kneebatch.inputs.manifest import RowProblem, SubjectSpec, parse_manifest
from kneebatch.network.provenance import model_info
from kneebatch.outdir.folder import refuse_other_settings, run_records
from kneebatch.outdir.key import legacy_key, subject_key
from kneebatch.outdir.records import SettingsRecord
from kneebatch.results.subject_files import (
    State,
    read_done,
    result_problem,
    result_state,
    subject_dir,
)
from kneebatch.scan.headers import check_headers

STARTUP_S = 4.0  # LocalCluster start, a worker's imports and model check (3-4 s measured on 2 cores)
NETWORK_EFFICIENCY = 0.4  # the network's GFLOP/s over a plain 3x3x3 convolution's (measured 0.34-0.44)
REASONS = {State.CHANGED: "inputs, settings or model changed since it was finished",
           State.DAMAGED: "its result files are damaged", State.LINKED: "a linked folder"}


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a run would do.

    Attributes:
        compute: subjects without a result.
        redo: (subject, why) for results that would be replaced.
        skip: subjects finished with these inputs and settings.
        unusable: manifest rows that cannot be used.
        refused: why the run would stop before computing anything ('' if it would not).
        workers, threads, memory_bytes: the local layout (workers 0: a joined cluster's).
        header_problems: (subject, message) of subjects whose headers fail now.
        peak_bytes, peak_subject: the largest predicted peak memory of one subject.
        knee_s, startup_s, wall_s: seconds per knee and worker, fixed, whole run.
        basis: where the seconds come from, in words.
    """

    compute: list[str]
    redo: list[tuple[str, str]]
    skip: list[str]
    unusable: list[RowProblem]
    refused: str
    workers: int
    threads: int
    memory_bytes: int
    header_problems: list[tuple[str, str]]
    peak_bytes: int
    peak_subject: str
    knee_s: float
    startup_s: float
    wall_s: float
    basis: str


def _recorded(out: Path) -> tuple[list[float], float | None]:
    """Seconds each subject in OUT kept its worker busy (its stages in ``done.json``, without
    the waits that ``total`` holds), and the fixed cost of the latest run that computed subjects
    (its wall time less its subjects' share per worker)."""
    totals = []
    for done_file in (out / "subjects").glob("*/done.json") if (out / "subjects").is_dir() else []:
        done = read_done(done_file.parent)
        stages = {k: v for k, v in done.timings_s.items() if k != "total"} if done else {}
        if stages:
            totals.append(float(sum(stages.values())))
    startup = None
    for record in reversed(run_records(out)):
        ok = record.counts.ok if record.counts else 0
        if ok and record.workers and record.wall_s and totals:
            startup = max(0.0, record.wall_s - ok * statistics.median(totals) / record.workers)
            break
    return totals, startup


def _calibrate(spec: SubjectSpec, options: RunOptions, threads: int) -> float:
    """Seconds of one knee, measured: its read and preprocessing for real, its forward pass from
    the network's FLOPs at this machine's measured 3D-convolution rate on ``threads``."""
    import torch

    from kneebatch.config import REGIONS
    from kneebatch.extract.pipeline import Stage, prepare_subject
    from kneebatch.network.flops import forward_flops

    start = time.perf_counter()
    prepared = prepare_subject(spec, options.config, stage=Stage(),
                               read_timeout_s=options.read_timeout_s)
    prepare_s = time.perf_counter() - start
    flops = forward_flops([prepared.regions.region(name)[0].shape for name in REGIONS],
                          options.config.layers)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        conv = torch.nn.Conv3d(128, 32, 3, padding=1)
        x = torch.randn(1, 128, 24, 24, 24)
        with torch.no_grad():
            conv(x)
            start = time.perf_counter()
            for _ in range(3):
                conv(x)
            rate = 3 * 2 * 128 * 32 * 27 * 24**3 / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return prepare_s + flops / (rate * NETWORK_EFFICIENCY)


def plan_run(manifest: Path, out: Path, model_path: Path, options: RunOptions,
             cluster: ClusterSpec) -> Plan:
    """What ``run`` would do with these arguments (reads only).

    Raises:
        KneebatchError: the manifest or model cannot be used (as ``run`` would say).
    """
    specs, unusable = parse_manifest(manifest, options.labels)
    mine = shard(specs, options.part)
    info = model_info(model_path)
    config_hash = options.config.hash()
    ours = SettingsRecord(config_hash, info.sha256, info.weights, options.config.to_dict())
    refused = ""
    try:
        refuse_other_settings(out, ours, overwrite=options.overwrite)  # as the run would
    except ConfigError as exc:
        refused = exc.message.rstrip(".")
    compute, redo, skip = [], [], []
    for spec in mine:
        state = result_state(out, spec.subject_id, subject_key(spec, config_hash, info.sha256))
        done = read_done(subject_dir(out, spec.subject_id)) if state is State.CHANGED else None
        if done and done.key == legacy_key(spec, config_hash, info.sha256, done.extra):
            state = State.FINISHED  # an earlier version's key: run rekeys it, computes nothing
        if state is State.FINISHED and not options.overwrite:
            skip.append(spec.subject_id)
        elif state is State.FINISHED:
            redo.append((spec.subject_id, "--overwrite"))
        elif state is State.MISSING:
            compute.append(spec.subject_id)
        else:
            why = result_problem(out, spec.subject_id) if state is State.DAMAGED else ""
            redo.append((spec.subject_id, why or REASONS[state]))
    wanted = set(compute) | {subject for subject, _ in redo}
    todo = [s for s in mine if s.subject_id in wanted]
    workers, threads = layout(cluster) if cluster.local else (0, cluster.threads_per_worker or 1)
    memory = cluster.memory_limit_bytes or (job_memory_bytes()[0] // workers if workers else 0)
    header_problems, peak, peak_subject = [], 0, ""
    for spec in todo:
        try:
            ct, mask = check_headers(spec, options.config, options.read_timeout_s)
        except KneebatchError as exc:
            header_problems.append((spec.subject_id, exc.message))
            continue
        need = estimate_bytes(ct.size, ct.spacing, options.config, mask.size)
        if need > peak:
            peak, peak_subject = need, spec.subject_id
    totals, startup = _recorded(out)
    if totals:
        knee_s = statistics.median(totals)
        basis = f"the median of {len(totals)} subject(s) already computed in {out}"
    else:
        sample = next((s for s in todo if s.subject_id not in dict(header_problems)), None)
        knee_s = _calibrate(sample, options, threads) if sample else 0.0
        basis = (f"a calibration now (subject {sample.subject_id} read and preprocessed, its "
                 "forward pass from its FLOPs at this machine's measured convolution rate)"
                 if sample else "nothing to compute")
    startup_s = STARTUP_S if startup is None else startup
    slots = workers or 1
    wall = (startup_s + len(todo) * knee_s / slots) if todo else 0.0
    return Plan(compute, redo, skip, unusable, refused, workers, threads, memory,
                header_problems, peak, peak_subject, knee_s, startup_s, wall, basis)
