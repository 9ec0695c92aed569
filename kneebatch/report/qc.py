"""QC pictures for a finished run: redo each subject's input stages (read, regions) with the
settings in its ``done.json`` and draw what the network was fed."""

from __future__ import annotations

import logging
from pathlib import Path

from kneebatch.config import ExtractionConfig
from kneebatch.errors import KneebatchError
from kneebatch.inputs.labels import LabelMap
from kneebatch.inputs.manifest import SubjectSpec
from kneebatch.outdir.claims import holder
from kneebatch.report.qc_picture import qc_title, write_qc
from kneebatch.results.subject_files import read_done
from kneebatch.scan.read import load_scan
from kneebatch.scan.regions import make_regions

log = logging.getLogger(__name__)


def write_subject_qc(folder: Path) -> Path:
    """(Re)draw ``folder/qc.png`` from the subject's inputs and ``done.json``.

    Raises:
        KneebatchError: the inputs cannot be read any more.
    """
    done = read_done(folder)
    if done is None:
        raise FileNotFoundError(f"{folder} has no readable done.json")
    spec = SubjectSpec(done.subject_id, Path(done.ct), Path(done.mask), done.side,
                       labels=LabelMap.parse(done.labels) if done.labels else LabelMap(),
                       bilateral=done.bilateral)
    config = ExtractionConfig.from_dict(done.config)
    regions = make_regions(load_scan(spec, config), config)
    title = qc_title(spec.subject_id, spec.side, regions.spacing_mm, done.weights)
    return write_qc(folder, regions, title)


def write_missing_qc(out: Path, redo: bool = False) -> tuple[int, int]:
    """Draw ``qc.png`` for every finished subject lacking one (all of them with ``redo``).

    Returns:
        (written, failed) counts.
    """
    written = failed = 0
    for done_file in sorted((out / "subjects").glob("*/done.json")):
        folder = done_file.parent
        if folder.is_symlink() or ((folder / "qc.png").is_file() and not redo):
            continue
        if holder(out, folder.name) is not None:
            continue  # a run is (re)computing it right now: its files are the run's to write
        try:
            write_subject_qc(folder)
            written += 1
        except (KneebatchError, OSError) as exc:
            failed += 1
            log.error("Subject %s: no QC picture: %s", folder.name, exc)
    return written, failed
