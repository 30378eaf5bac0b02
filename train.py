"""Train an OOD-aware classifier: ``python train.py --config configs/quickstart.yaml [--model.lr 0.05 ...]``."""

from gradreg.cli import train_main

if __name__ == "__main__":
    train_main()
