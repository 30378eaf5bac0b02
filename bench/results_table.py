"""Markdown summary of several ``evaluate.py`` runs: ID accuracy and mean AUROC / FPR95 over the OOD sets per scorer.

python bench/results_table.py ce=runs/results/fmnist-ce-001/eval greg=runs/results/fmnist-greg-001/eval
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def pct(value: float | None) -> str:
    """A metric in %, or "-" for the null that results.json holds for a scorer with non-finite scores."""
    return "-" if value is None else f"{100 * value:.1f}"


def main(pairs: list[str]) -> None:
    """Print one table row per ``label=eval_dir`` pair, then a per-set energy AUROC table."""
    docs = {
        label: json.loads((Path(d) / "results.json").read_text()) for label, _, d in (p.partition("=") for p in pairs)
    }
    scorers = next(iter(docs.values()))["scorers"]
    print("Mean over the OOD test sets, AUROC / FPR95 (%):\n")
    print("| method | ID acc | " + " | ".join(scorers) + " |")
    print("|---|---|" + "---|" * len(scorers))
    for label, doc in docs.items():
        cells = [f"{pct(doc['means']['ood'][s]['auroc'])} / {pct(doc['means']['ood'][s]['fpr95'])}" for s in scorers]
        print(f"| {label} | {100 * doc['id']['accuracy']:.1f} | " + " | ".join(cells) + " |")
    sets = list(next(iter(docs.values()))["sets"])
    print("\nEnergy-score AUROC (%) per set (`attacked/<set>`: the same OOD images after the energy attack):\n")
    print("| method | " + " | ".join(sets) + " |")
    print("|---|" + "---|" * len(sets))
    for label, doc in docs.items():
        cells = [pct(doc["sets"][s]["metrics"]["energy"]["auroc"]) if s in doc["sets"] else "-" for s in sets]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or any(a.startswith("-") or "=" not in a for a in args):
        sys.exit(f"usage: python {sys.argv[0]} LABEL=EVAL_DIR ... (each EVAL_DIR holds an evaluate.py results.json)")
    missing = [a.partition("=")[2] for a in args if not (Path(a.partition("=")[2]) / "results.json").is_file()]
    if missing:
        sys.exit(f"error: no results.json in {', '.join(missing)}: pass evaluate.py's output folders (eval-NNN)")
    main(args)
