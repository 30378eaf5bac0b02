"""Markdown summary of several ``evaluate.py`` runs: ID accuracy and mean AUROC / FPR95 over the OOD sets per scorer.

python bench/results_table.py ce=runs/results/fmnist-ce-seed0-001/eval greg=runs/results/fmnist-greg-seed0-001/eval

A label may name several evaluations, comma-separated (one per seed): its cells are then the mean ± the sample
standard deviation over them.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any


def cell(values: list[float | None]) -> str:
    """Metrics in %: one value, or mean ± sample std; "-" if any is the null results.json holds for NaN scores."""
    if any(v is None for v in values):
        return "-"
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def main(pairs: list[str]) -> None:
    """Print one table row per ``label=eval_dir[,eval_dir...]`` argument, then a per-set energy AUROC table."""
    docs: dict[str, list[dict[str, Any]]] = {
        label: [json.loads((Path(d) / "results.json").read_text()) for d in dirs.split(",")]
        for label, _, dirs in (p.partition("=") for p in pairs)
    }
    first = next(iter(docs.values()))[0]
    # every scorer of any evaluation, in order of appearance; one that an evaluation lacks is "-" in its cells
    scorers = list(dict.fromkeys(s for runs_of in docs.values() for d in runs_of for s in d["scorers"]))
    runs = sorted({len(runs) for runs in docs.values()})
    spread = " (mean ± sample standard deviation over " + "/".join(map(str, runs)) + " runs)" if runs != [1] else ""
    print(f"Mean over the OOD test sets, AUROC / FPR95 (%){spread}:\n")
    print("| method | ID acc | " + " | ".join(scorers) + " |")
    print("|---|---|" + "---|" * len(scorers))
    for label, runs_of in docs.items():
        cells = [
            cell([d["means"]["ood"].get(s, {}).get("auroc") for d in runs_of])
            + " / "
            + cell([d["means"]["ood"].get(s, {}).get("fpr95") for d in runs_of])
            for s in scorers
        ]
        print(f"| {label} | {cell([d['id']['accuracy'] for d in runs_of])} | " + " | ".join(cells) + " |")
    sets = list(first["sets"])
    print(
        f"\nEnergy-score AUROC (%) per set{spread} (`attacked/<set>`: the same OOD images after the energy attack):\n"
    )
    print("| method | " + " | ".join(sets) + " |")
    print("|---|" + "---|" * len(sets))
    for label, runs_of in docs.items():
        cells = [
            cell([d["sets"].get(s, {}).get("metrics", {}).get("energy", {}).get("auroc") for d in runs_of])
            for s in sets
        ]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    args = sys.argv[1:]
    usage = f"usage: python {sys.argv[0]} LABEL=EVAL_DIR[,EVAL_DIR...] ... (folders with evaluate.py's results.json)"
    if args in (["-h"], ["--help"]):
        print(f"{usage}\n\n{__doc__}")
        sys.exit(0)
    if not args or any(a.startswith("-") or "=" not in a for a in args):
        sys.exit(usage)
    dirs = [d for a in args for d in a.partition("=")[2].split(",")]
    missing = [d for d in dirs if not (Path(d) / "results.json").is_file()]
    if missing:
        sys.exit(f"error: no results.json in {', '.join(missing)}: pass evaluate.py's output folders (eval-NNN)")
    main(args)
