"""Per-step cost of GReg+'s energy-cluster outlier selection relative to the GReg training step.

Times, on one device and with random weights (median over ``--repeats`` after ``--warmup``):

- ``forward``: the eval-mode, no-grad forward of the candidate batch (features + logits);
- ``forward_bf16``: the same under bf16 autocast (what a ``bf16-mixed`` run does);
- ``seeding_*`` / ``kmeans_*``: :func:`gradreg.samplers.kmeans` on the L2-normalized features
  (k = min(num_clusters, n_id)) with one Lloyd iteration (~ the k-means++ seeding) / to convergence,
  ``eager`` or replaying CUDA graphs (``graph``, CUDA only; checked equal to eager first);
- ``select`` / ``select_bf16``: the whole :class:`gradreg.samplers.EnergyClusterSampler` call (forward + k-means +
  selection; graphs on CUDA), fp32 / bf16 autocast;
- ``sklearn``: scikit-learn ``KMeans`` (same k, n_init, k-means++) on the same features, device-to-host copy
  included (what the official code does every step);
- ``step_greg_plus`` / ``step_greg``: one training step (train mode, one forward of ID + outliers, CE + energy
  margin loss + the gradient-norm penalty with double backprop, backward, SGD) with ``2 * n_id`` (GReg+,
  two-way) or ``n_id`` (GReg) outliers; ``_bf16`` under bf16 autocast.

Usage::

    python bench/sampler.py                              # GPU if available: WRN-40-2, 64 ID / 384 candidates
    python bench/sampler.py --device cpu --id-batch 16   # smaller CPU run (candidates = ratio x ID batch)

Prints a markdown table and writes the numbers as JSON to ``--out`` (default ``bench/results/sampler.json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from scorers import require_device

from gradreg.double_backward import use_double_backward
from gradreg.kmeans import kmeans
from gradreg.losses import energy, energy_margin_loss, grad_norm_penalty
from gradreg.models import MODELS
from gradreg.samplers import EnergyClusterSampler, forward_candidates


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    """Median wall time of ``fn`` in milliseconds."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--arch", default="wrn40_2")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--id-batch", type=int, default=64)
    parser.add_argument("--ratio", type=int, default=6, help="candidates per ID image (GReg: 384 / 64)")
    parser.add_argument("--num-clusters", type=int, default=64)
    parser.add_argument("--n-init", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--out", default="bench/results/sampler.json")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    require_device(args.device)
    device = torch.device(args.device)
    torch.manual_seed(0)
    # The double-backward layers GradRegModule trains with (the candidates' forward runs through them too).
    model = use_double_backward(MODELS.build({"name": args.arch, "num_classes": args.num_classes})).to(device).train()
    n_id, n_cand = args.id_batch, args.ratio * args.id_batch
    shape = (3, args.image_size, args.image_size)
    x_id = torch.randn(n_id, *shape, device=device)
    y = torch.randint(args.num_classes, (n_id,), device=device)
    cand = torch.randn(n_cand, *shape, device=device)
    k = min(args.num_clusters, n_id)
    sampler = EnergyClusterSampler(num_clusters=args.num_clusters, n_init=args.n_init)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True, weight_decay=1e-4)

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    feats, _ = forward_candidates(model, cand)
    normed = F.normalize(feats.float(), dim=1)
    gen = torch.Generator(device=device).manual_seed(0)
    graphs = [False, True] if device.type == "cuda" else [False]

    def bf16(fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return fn()

        return run

    def sklearn_kmeans() -> None:
        KMeans(k, n_init=args.n_init, random_state=0).fit(normed.cpu().numpy())

    def step(n_out: int) -> Callable[[], None]:
        def run() -> None:
            x = torch.cat([x_id, cand[:n_out]]).requires_grad_(True)
            logits = model(x)
            e_in, e_out = energy(logits[:n_id]), energy(logits[n_id:])
            loss = F.cross_entropy(logits[:n_id].float(), y) + 0.1 * energy_margin_loss(e_in, e_out)
            loss = loss + grad_norm_penalty(x, e_in, e_out).value
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return run

    # The CUDA-graph k-means must give the eager result (same random numbers, same kernels).
    agree = {}
    if device.type == "cuda":
        for seed in range(3):
            eager = kmeans(
                normed, k, args.n_init, generator=torch.Generator(device).manual_seed(seed), cuda_graph=False
            )
            graph = kmeans(normed, k, args.n_init, generator=torch.Generator(device).manual_seed(seed), cuda_graph=True)
            agree[seed] = bool(torch.equal(eager[0], graph[0])) and bool(torch.allclose(eager[1], graph[1]))
        print(f"CUDA-graph k-means equals eager k-means: {agree}", flush=True)

    r, w = args.repeats, args.warmup
    ms = {
        "forward": timed(lambda: forward_candidates(model, cand), device, r, w),
        "forward_bf16": timed(bf16(lambda: forward_candidates(model, cand)), device, r, w),
    }
    for graph in graphs:
        tag = "graph" if graph else "eager"
        ms[f"seeding_{tag}"] = timed(
            lambda g=graph: kmeans(normed, k, args.n_init, 1, generator=gen, cuda_graph=g), device, r, w
        )
        ms[f"kmeans_{tag}"] = timed(
            lambda g=graph: kmeans(normed, k, n_init=args.n_init, generator=gen, cuda_graph=g), device, r, w
        )
    tag = "graph" if device.type == "cuda" else "eager"  # the path kmeans takes by default
    ms["select"] = timed(lambda: sampler.select(model, cand, n_id), device, r, w)
    ms["select_bf16"] = timed(bf16(lambda: sampler.select(model, cand, n_id)), device, r, w)
    ms["sklearn"] = timed(sklearn_kmeans, device, r, w)
    ms["step_greg_plus"] = timed(step(min(2 * n_id, n_cand)), device, r, w)
    ms["step_greg_plus_bf16"] = timed(bf16(step(min(2 * n_id, n_cand))), device, r, w)
    ms["step_greg"] = timed(step(min(n_id, n_cand)), device, r, w)
    # Random weights: a trained model's features may need more (or fewer) Lloyd iterations; the forward is the same.
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    result = {
        "device": str(device),
        "device_name": device_name,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "arch": args.arch,
        "id_batch": n_id,
        "candidates": n_cand,
        "k": k,
        "n_init": args.n_init,
        "graph_equals_eager": agree,
        "ms": ms,
        "ratios": {
            "select / step_greg_plus": ms["select"] / ms["step_greg_plus"],
            "select_bf16 / step_greg_plus_bf16": ms["select_bf16"] / ms["step_greg_plus_bf16"],
            f"kmeans_{tag} / step_greg_plus": ms[f"kmeans_{tag}"] / ms["step_greg_plus"],
            "sklearn / step_greg_plus": ms["sklearn"] / ms["step_greg_plus"],
            "(select + step_greg_plus) / step_greg": (ms["select"] + ms["step_greg_plus"]) / ms["step_greg"],
            f"sklearn / kmeans_{tag}": ms["sklearn"] / ms[f"kmeans_{tag}"],
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))

    print(f"{args.arch} on {device} ({device_name}, {torch.get_num_threads()} threads), "
          f"{n_id} ID / {n_cand} candidates, k={k}, n_init={args.n_init}")  # fmt: skip
    print("\n| part | ms | / GReg+ step |\n|---|---|---|")
    for name, value in ms.items():
        print(f"| {name} | {value:.1f} | {value / ms['step_greg_plus']:.2f} |")
    for name, value in result["ratios"].items():
        print(f"{name}: {value:.2f}")


if __name__ == "__main__":
    main()
