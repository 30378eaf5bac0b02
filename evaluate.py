"""Evaluate a checkpoint on the OOD benchmark: ``python evaluate.py runs/latest [--out DIR] [--scorers ...]``."""

import sys

try:
    from gradreg.cli import evaluate_main
except KeyboardInterrupt:  # Ctrl-C while the libraries load (a few seconds): one line, as later
    print("interrupted: stopped by Ctrl-C", file=sys.stderr)
    raise SystemExit(130) from None

if __name__ == "__main__":
    evaluate_main()
