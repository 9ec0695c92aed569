"""Benchmark: `kneebatch status OUT` on a finished OUT of 1,000 subjects, in a fresh process
(imports included), twice; writes `benchmarks/status.json`.

The subjects are made as in `gather.py` (result files of the real size and layout). status reads
every subject's `done.json` and checks its files (checksums, shapes, finite values).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from gather import make_finished_out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=1_000)
    parser.add_argument("--json", type=Path, default=Path(__file__).with_name("status.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        make_finished_out(out, args.subjects)
        walls = []
        for _ in range(2):
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "kneebatch", "status", str(out)],
                                  capture_output=True, text=True)
            walls.append(round(time.perf_counter() - start, 2))
            if done.returncode != 0 or f"finished {args.subjects:>6}" not in done.stdout:
                print(done.stdout, done.stderr, file=sys.stderr)
                return 1
    print(f"status of {args.subjects} finished subjects (fresh process): {walls} s")
    args.json.write_text(json.dumps({"subjects": args.subjects, "status_wall_s": walls},
                                    indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
