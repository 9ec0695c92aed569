"""Commands on a finished OUT: ``status``, ``gather``, ``merge``, ``export`` and ``report``."""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

from kneebatch.cli.options import EXIT_FAILED, EXIT_OK, add_out_folder


def _cmd_config(args: argparse.Namespace) -> int:
    import json

    from kneebatch.errors import ConfigError
    from kneebatch.inputs.settings import settings_toml

    record = args.out / "run.json"
    try:
        text = record.read_text()
    except OSError as exc:
        raise ConfigError(f"{record} cannot be read ({exc.strerror}): `kneebatch config` needs a "
                          "run's output folder.") from exc
    print(settings_toml(json.loads(text)), end="")
    return EXIT_OK


def _cmd_gather(args: argparse.Namespace) -> int:
    from kneebatch.results.gather import gather_run

    result = gather_run(args.out)
    print(f"Gathered {result.subjects} subject(s) ({result.similarity_rows} similarity rows, "
          f"{result.feature_rows} feature rows) into {args.out}; {result.failures} failure(s) "
          "in failures.csv")
    if result.left_out:
        print(f"Left out {result.left_out} folder(s) under {args.out / 'subjects'} that are not "
              "in the last run's manifest.")
    if result.pending:
        print(f"{len(result.pending)} subject(s) of the manifest have no current result yet "
              f"(e.g. {', '.join(result.pending[:3])}); rerun `kneebatch run` to compute them.")
    return EXIT_FAILED if result.pending else EXIT_OK


def _cmd_merge(args: argparse.Namespace) -> int:
    from kneebatch.results.merge import merge_runs

    result = merge_runs(args.runs, args.out)
    print(f"Merged {len(result.sources)} run folder(s) into {args.out}: {result.subjects} "
          f"subject(s) in similarities/, features/ and regions/; {result.failures} failure(s) "
          "in failures.csv")
    return EXIT_OK


def _cmd_export(args: argparse.Namespace) -> int:
    from kneebatch.outdir.folder import check_owned
    from kneebatch.results.tables import export_wide

    check_owned(args.out)
    matrix = export_wide(args.out, args.wide, args.layer, args.region,
                         with_extras=args.with_extras)
    print(f"Wrote {args.wide}: {matrix.shape[0]} subject(s) x {matrix.shape[1]} feature(s)")
    return EXIT_OK


def _cmd_status(args: argparse.Namespace) -> int:
    from kneebatch.cohort.progress import duration
    from kneebatch.cohort.status import cohort_status

    status = cohort_status(args.out, args.manifest)
    print(f"{args.out}: {status.total} subject(s) in the manifest")
    print(f"  finished {len(status.finished):>6}")
    stages = ", ".join(f"{stage} {n}" for stage, n in status.failures_by_stage().items())
    print(f"  failed   {status.failed_count:>6}" + (f"   by stage: {stages}" if stages else ""))
    where = collections.Counter(f"{h.host} (pid {h.pid}{', job ' + h.job_id if h.job_id else ''})"
                                for h in status.running.values())
    print(f"  running  {len(status.running):>6}"
          + (f"   on {', '.join(f'{w}: {n}' for w, n in where.items())}" if where else ""))
    print(f"  pending  {len(status.pending):>6}")
    run = status.run
    if run is not None:
        state = status.run_state
        if state == "stopped" and not run.ended:
            state = "stopped: its process is gone (killed, or out of walltime)"
        rate = (f"{status.rate_per_h:.0f} knees/h" if status.rate_per_h else "no subject yet")
        eta = status.eta_s
        print(f"latest run {run.run_id} ({state}, started {run.started}): {rate}"
              + (f", ETA {duration(eta)}" if eta and (status.running or status.pending) else ""))
    damaged = [r for r in status.failed.values() if r.stage == "result"]
    for record in damaged[:5]:
        print(f"damaged: {record.error}")
    if status.failed_count:
        print(f"failures: {args.out / 'failures.csv'}")
    return EXIT_OK


def _cmd_report(args: argparse.Namespace) -> int:
    from kneebatch.outdir.folder import check_owned
    from kneebatch.report.figures import write_cohort_report

    check_owned(args.out)
    if not args.no_qc:
        from kneebatch.report.qc import write_missing_qc

        written, failed = write_missing_qc(args.out, redo=args.redo_qc)
        print(f"QC pictures in {args.out / 'subjects'}: {written} drawn now, the others were "
              "there already (--redo-qc redraws them)"
              + (f"; {failed} could not be made (see the log)" if failed else ""))
    index = write_cohort_report(args.out, by=args.by)
    print(f"Cohort report: {index}")
    return EXIT_OK


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``report``, ``status``, ``gather``, ``merge``, ``export``, ``config`` command(s) to
    the parser."""
    p = sub.add_parser("report", help="QC pictures per subject and cohort figures in OUT/report")
    add_out_folder(p)
    p.add_argument("--no-qc", action="store_true", help="cohort figures only")
    p.add_argument("--redo-qc", action="store_true", help="redraw existing qc.png too")
    p.add_argument("--by", default=None, metavar="COLUMN",
                   help="group the cosine figure by a manifest column, e.g. --by site")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("status", help="finished / failed / running / pending subjects, rate, ETA")
    add_out_folder(p)
    p.add_argument("manifest", type=Path, nargs="?", default=None,
                   help="count against this manifest (default: the last run's)")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("gather", help="rebuild the Parquet datasets from OUT/subjects")
    add_out_folder(p)
    p.set_defaults(func=_cmd_gather)

    p = sub.add_parser("merge", help="one dataset from several run folders of the same settings")
    p.add_argument("runs", type=Path, nargs="+", metavar="RUN",
                   help="run folders (each gathered), made with the same settings and model")
    p.add_argument("--out", type=Path, required=True,
                   help="the merged folder to write (new, empty, or an earlier merge)")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("export", help="the features as one wide subject x feature table")
    add_out_folder(p)
    p.add_argument("--wide", type=Path, required=True, metavar="FILE",
                   help="the table to write: FILE.parquet (or FILE.csv), outside OUT; one row "
                        "per subject: subject_id, scan_id, side, then <region>.<layer>.<i>")
    p.add_argument("--with-extras", action="store_true",
                   help="add the manifest's extra columns (covariates) after side")
    p.add_argument("--layer", default=None, help="only this layer (default: every layer)")
    p.add_argument("--region", default=None, help="only this region (default: all three)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("config", help="a finished run's settings as a TOML file for "
                                      "`kneebatch run --config` (printed)")
    add_out_folder(p)
    p.set_defaults(func=_cmd_config)
