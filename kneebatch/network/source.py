"""The weights source: a typed name of where a model's weights came from (torch-free, so the report
and status can read it)."""

from __future__ import annotations

import dataclasses
from typing import Literal


@dataclasses.dataclass(frozen=True)
class WeightsSource:
    """Where a model's weights came from; ``str()`` is the form written to every output
    (``imagenet:IMAGENET1K_V1``, ``random:seed=0``, ``file:NAME:sha256=PREFIX``).

    Attributes:
        kind: ``imagenet``, ``random`` or ``file``.
        seed: the seed of random weights.
        name: the file name of a local checkpoint, or the torchvision weights' name.
        sha256: the first 16 hex digits of a local checkpoint's sha256.
    """

    kind: Literal["imagenet", "random", "file"]
    seed: int | None = None
    name: str = ""
    sha256: str = ""

    def __str__(self) -> str:
        if self.kind == "imagenet":
            return f"imagenet:{self.name or 'IMAGENET1K_V1'}"
        if self.kind == "random":
            return f"random:seed={self.seed}"
        return f"file:{self.name}:sha256={self.sha256}"

    @property
    def is_random(self) -> bool:
        """Seeded random weights: for tests and offline demos only."""
        return self.kind == "random"

    @property
    def option(self) -> str:
        """The ``--weights`` value that rebuilds these weights (a file by its name)."""
        return self.name if self.kind == "file" else self.kind

    @classmethod
    def parse(cls, text: str) -> WeightsSource:
        """The inverse of ``str()``; an unknown form is kept as a file of that name."""
        kind, _, rest = text.partition(":")
        if kind == "imagenet":
            return cls("imagenet", name=rest or "IMAGENET1K_V1")
        if kind == "random":
            seed = rest.removeprefix("seed=")
            return cls("random", seed=int(seed) if seed.lstrip("-").isdigit() else None)
        name, _, digest = rest.rpartition(":sha256=")
        return cls("file", name=name if kind == "file" else text, sha256=digest)


IMAGENET = WeightsSource("imagenet", name="IMAGENET1K_V1")
