"""Train an OOD-aware classifier: ``python train.py --config configs/quickstart.yaml [--model.lr 0.05 ...]``."""

import sys

try:
    from gradreg.cli import train_main
except KeyboardInterrupt:  # Ctrl-C while the libraries load (a few seconds): one line, as later
    print("interrupted: stopped by Ctrl-C", file=sys.stderr)
    raise SystemExit(130) from None

if __name__ == "__main__":
    train_main()
