"""One markdown table from ``run.sh``'s outputs: per workload and optimizer, what the recipe recorded (the race's
mean ± spread over its seeds), what 5 fresh seeds gave (validation and test), and the seconds to the common target
(on the YAML's evaluation grid and, from ``compare-fine.json``, on the 4x finer one).

    python benchmarks/strangers/summarize.py /tmp/strangers-out > benchmarks/strangers/results/summary.md
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def pm(stat: dict | None, pattern: str = "{:.4f}") -> str:
    return "—" if stat is None else f"{pattern.format(stat['mean'])} ± {pattern.format(stat['spread'])}"


def finer(row: dict | None, data: dict | None) -> str:
    """Seconds to the common target of the compare on the finer evaluation grid, with that compare's target."""
    if row is None or data is None:
        return "—"
    return f"{pm(row.get('seconds_to_target'), '{:.2f}')} (≤ {data['target']:.4g})"


def race_line(log: Path) -> str:
    """The search's closing `race: ...` line (it wraps in a narrow terminal)."""
    text = " ".join(log.read_text().split())
    start = text.find("race: ")
    return text[start:].split(" best recipe")[0] if start >= 0 else "no race"


def main(out: Path) -> None:
    print("| workload | optimizer | recorded eval_loss (race seeds) | fresh eval_loss (5 seeds) | fresh test_loss | "
          "fresh test_accuracy | seconds to target | steps to target | ms / step | common target | "
          "seconds to target, 4x finer grid (its target) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    races = []
    for workload in sorted(p for p in out.iterdir() if (p / "compare.json").exists()):
        data = json.loads((workload / "compare.json").read_text())
        fine_path = workload / "compare-fine.json"
        fine = json.loads(fine_path.read_text()) if fine_path.exists() and fine_path.stat().st_size else None
        fine_rows = {row["recipe"]: row for row in fine["recipes"]} if fine else {}
        for row in data["recipes"]:
            rec = row["recorded"]
            test = row.get("test") or {}
            print(f"| {workload.name} | {row['optimizer']} | {pm(rec)} ({rec['seeds']}) | {pm(row.get('final'))}"
                  f"{' (' + str(row['diverged']) + ' diverged)' if row['diverged'] else ''} | "
                  f"{pm(test.get('test_loss'))} | {pm(test.get('test_accuracy'), '{:.3f}')} | "
                  f"{pm(row.get('seconds_to_target'), '{:.2f}')} | {pm(row.get('steps_to_target'), '{:.0f}')} | "
                  f"{pm(row.get('step_time_ms'), '{:.1f}')} | ≤ {data['target']:.4g} | "
                  f"{finer(fine_rows.get(row['recipe']), fine)} |")
            races.append(f"- {workload.name} {row['optimizer']}: "
                         f"{race_line(workload / ('search-' + row['optimizer'] + '.log'))}")
    print("\n" + "\n".join(races))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
