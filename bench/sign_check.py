"""Sign check of every registered scorer on a small model trained on real digits (docs/scorers.md, "Sign check").

Recipe (also the fixture of ``tests/test_scorers.py::test_scorer_ranks_id_digits_above_noise``): scikit-learn's
8x8 digits, ID = classes 0-5 (800 training images, held-out test images after them), a SmallCNN of width 8 with
the absent-class head of DOS/NTOM, 100 SGD steps (lr 0.1, momentum 0.9) of 64 ID images with cross-entropy over
K+1 logits plus 32 digits 6-7 towards the absent class. Each scorer's AUROC (ID positive) against uniform noise and
against digits 8-9 (never seen in training) must be above 0.5 if its sign is right.

Example:
    python bench/sign_check.py --test-images 200
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from gradreg.losses import absent_class_loss
from gradreg.models import SmallCNN, add_absent_head, logits_with_absent
from gradreg.scorers import SCORERS, build

SPECS = [{"name": n} for n in SCORERS.names()] + [{"name": "margin", "subspace": s} for s in ("low", "high")]


def train_digits_model(test_images: int) -> tuple[SmallCNN, Tensor, Tensor, Tensor]:
    """The trained model (eval mode) and normalized ID test images, uniform noise and digits 8-9, as many of each."""
    torch.manual_seed(0)
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target)
    outliers, unseen = images[(labels == 6) | (labels == 7)], images[labels >= 8][:test_images]
    keep = labels < 6
    perm = torch.randperm(int(keep.sum()))
    images, labels = images[keep][perm], labels[keep][perm]
    train, test = slice(0, 800), slice(800, 800 + test_images)
    mean, std = images[train].mean().item(), images[train].std().item()
    model = SmallCNN(num_classes=6, in_channels=1, width=8)
    add_absent_head(model)
    model.set_normalization([mean], [std])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x_train, x_out = (images[train] - mean) / std, (outliers - mean) / std
    for _ in range(100):
        idx, out = torch.randint(0, x_train.shape[0], (64,)), torch.randint(0, x_out.shape[0], (32,))
        logits = logits_with_absent(model, model.features(torch.cat([x_train[idx], x_out[out]])))
        loss = F.cross_entropy(logits[:64], labels[train][idx]) + absent_class_loss(logits[64:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x_id = (images[test] - mean) / std
    x_noise = (torch.rand(test_images, 1, 8, 8) - mean) / std
    assert (model(x_id).argmax(dim=1) == labels[test]).float().mean() > 0.9
    return model, x_id, x_noise, (unseen - mean) / std


def auroc(scores_id: Tensor, scores_ood: Tensor) -> float:
    """AUROC with ID positive (``sklearn.metrics.roc_auc_score``)."""
    truth = np.r_[np.ones(len(scores_id)), np.zeros(len(scores_ood))]
    return float(roc_auc_score(truth, torch.cat([scores_id, scores_ood]).numpy()))


def main(argv: list[str] | None = None) -> None:
    """Print the AUROC table of every scorer."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test-images", type=int, default=200, help="ID, noise and digits 8-9 images each")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model, x_id, x_noise, x_unseen = train_digits_model(args.test_images)
    print("| scorer | vs noise | vs digits 8-9 |\n|---|---|---|")
    for spec in SPECS:
        scorer = build(spec)
        scores_id = scorer(model, x_id)
        noise, unseen = (auroc(scores_id, scorer(model, x)) for x in (x_noise, x_unseen))
        print(f"| {' '.join(str(v) for v in spec.values())} | {noise:.3f} | {unseen:.3f} |")


if __name__ == "__main__":
    main()
