"""Settings files (``kneebatch run --config FILE``): a TOML file, or a finished run's ``run.json``,
holding extraction settings (every ``ExtractionConfig`` field: what changes the numbers) and run
settings (labels, time limits, QC, column types, the local cluster's layout). Options given on the
command line win over the file. ``kneebatch config OUT`` writes a run's settings as TOML.

TOML layout::

    [extraction]          # ExtractionConfig's fields; spacing_mm = "native" for the native grid
    spacing_mm = 1.0
    layers = ["denseblock2", "denseblock3", "denseblock4"]
    [run]                 # RUN_KEYS
    labels = "tibia=1,femur=2"
    workers = 2
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from kneebatch.config import ExtractionConfig
from kneebatch.errors import ConfigError

# [run] key -> the ``kneebatch run`` option it stands for (its argparse dest)
RUN_KEYS = {"labels": "labels", "qc": "qc", "read_timeout_s": "read_timeout",
            "subject_timeout_s": "subject_timeout", "column_types": "column_types",
            "workers": "workers", "threads_per_worker": "threads_per_worker",
            "memory_per_worker": "memory_per_worker", "subjects_per_worker": "subjects_per_worker"}
NATIVE = "native"  # TOML has no null: spacing_mm = "native"


@dataclasses.dataclass(frozen=True)
class Settings:
    """One settings file.

    Attributes:
        extraction: ExtractionConfig fields (as ``to_dict`` writes them).
        run: ``RUN_KEYS`` -> value, as the option's text where the option parses text.
    """

    extraction: dict[str, Any]
    run: dict[str, Any]

    def config(self) -> ExtractionConfig:
        """The extraction settings (defaults where the file says nothing).

        Raises:
            ConfigError: an unusable value.
        """
        return ExtractionConfig.from_dict(self.extraction)

    def run_defaults(self) -> dict[str, Any]:
        """The run settings as ``kneebatch run`` argparse defaults (the command line wins)."""
        out = {}
        for key, value in self.run.items():
            if key == "column_types" and isinstance(value, dict):
                value = ",".join(f"{k}={v}" for k, v in value.items()) or None
            elif key in ("labels", "read_timeout_s", "subject_timeout_s") and value is not None:
                value = str(value)  # argparse converts text defaults with the option's type
            out[RUN_KEYS[key]] = value
        return out


def _from_run_record(record: dict[str, Any]) -> Settings:
    options = record.get("options") or {}
    run = {k: options[k] for k in RUN_KEYS if options.get(k) is not None}
    return Settings(dict(record.get("config") or {}), run)


def load_settings(path: Path) -> Settings:
    """Read a TOML settings file or a ``run.json``.

    Raises:
        ConfigError: missing or unreadable, or a table or key this version does not know.
    """
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"Settings file {path} cannot be read ({exc.strerror}).") from exc
    try:
        if path.suffix == ".json":
            return _from_run_record(json.loads(text))
        data = tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"Settings file {path} is not valid {path.suffix[1:] or 'TOML'}: "
                          f"{exc}.") from exc
    fields = {f.name for f in dataclasses.fields(ExtractionConfig)}
    unknown = [f"[{table}]" for table in data if table not in ("extraction", "run")]
    unknown += [f"extraction.{k}" for k in data.get("extraction", {}) if k not in fields]
    unknown += [f"run.{k}" for k in data.get("run", {}) if k not in RUN_KEYS]
    if unknown:
        raise ConfigError(f"Settings file {path}: unknown {', '.join(unknown)}. Known: "
                          f"[extraction] {', '.join(sorted(fields))}; [run] "
                          f"{', '.join(RUN_KEYS)}.")
    extraction = dict(data.get("extraction", {}))
    if extraction.get("spacing_mm") == NATIVE:
        extraction["spacing_mm"] = None
    return Settings(extraction, dict(data.get("run", {})))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(str(value))  # a TOML basic string


def settings_toml(record: dict[str, Any]) -> str:
    """A ``run.json``'s settings as a TOML settings file (``kneebatch config OUT``)."""
    settings = _from_run_record(record)
    lines = [f"# kneebatch settings of run {record.get('run_id', '?')} (config_hash "
             f"{record.get('config_hash', '?')}); use with: kneebatch run --config FILE", "",
             "[extraction]"]
    for key, value in sorted(settings.extraction.items()):
        lines.append(f"{key} = {_toml_value(NATIVE if value is None else value)}")
    lines += ["", "[run]"]
    lines += [f"{key} = {_toml_value(value)}" for key, value in settings.run.items()
              if value not in (None, {})]
    return "\n".join(lines) + "\n"
