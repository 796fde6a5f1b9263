"""Move result rows that the current benchmark no longer produces to bench/results/superseded-<model>.jsonl.

    python bench/prune_superseded.py [--dry-run]

Rows are resumable by label, so when a preset's schedule changes, the rows matched to its old compute count
(e.g. "fewer steps Euler (9)" once "fast" computed 9 of 28 steps, now 8) stay in the results and would still be
shown. A row is superseded when ``run_model`` (without peers) no longer produces its label at its step count; peer
rows are kept (their labels come from calibration probes). Kept, not deleted: the report skips the file.
Run it while no benchmark is writing to the results.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from benchmark import RESULTS, run_model  # noqa: E402

PEER_PREFIXES = ("diffusers", "cache-dit")


class _Labels:
    """Stands in for Bench: records the labels run_model asks for, answers with the stored rows."""

    def __init__(self, rows: list[dict], steps: int):
        self.rows = {r["label"]: r for r in rows if r["steps"] == steps and not r.get("fd_only")}
        self.labels: set[str] = set()

    def row(self, steps, label, family, make, **kwargs):
        self.labels.add(label)
        return self.rows.get(label, {"computed_steps": 1, "schedule": "C"})

    def pipe(self, *args, **kwargs):
        return None


def superseded(rows: list[dict]) -> list[dict]:
    out = []
    for steps in sorted({r["steps"] for r in rows}):
        wanted = _Labels(rows, steps)
        run_model(wanted, [steps], ["quality", "balanced", "fast"], peers=False)
        out += [r for r in rows if r["steps"] == steps and r["label"] not in wanted.labels
                and not r["label"].startswith(PEER_PREFIXES)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    for path in sorted(RESULTS.glob("mnist-*.jsonl")):
        lines = path.read_text().splitlines()
        rows = [json.loads(x) for x in lines]
        old = superseded(rows)
        ids = {id(r) for r in old}
        for r in old:
            print(f"{path.name}: {r['steps']} steps, {r['label']}{' (fd-only)' if r.get('fd_only') else ''}")
        if args.dry_run or not old:
            continue
        keep = [line for line, r in zip(lines, rows) if id(r) not in ids]
        moved = [line for line, r in zip(lines, rows) if id(r) in ids]
        with (RESULTS / f"superseded-{path.name}").open("a") as f:
            f.write("\n".join(moved) + "\n")
        path.write_text("\n".join(keep) + "\n")


if __name__ == "__main__":
    main()
