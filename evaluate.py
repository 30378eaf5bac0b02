"""Evaluate a checkpoint on the OOD benchmark: ``python evaluate.py runs/latest [--out DIR] [--scorers ...]``."""

from gradreg.cli import evaluate_main

if __name__ == "__main__":
    evaluate_main()
