from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score
from torch.utils.data import Dataset

import gradreg.kmeans
from gradreg.data import OODDataModule
from gradreg.data.datasets import ArrayDataset, ImageSpec, Transformed, build_transform
from gradreg.data.outliers import OutlierStream
from gradreg.losses import energy
from gradreg.models import SmallCNN, add_absent_head
from gradreg.module import GradRegModule
from gradreg.registry import RegistryError, SettingError
from gradreg.samplers import (
    SAMPLERS,
    DOSSampler,
    EnergyClusterSampler,
    NTOMSampler,
    POEMSampler,
    cluster_extremes,
    cluster_select,
    forward_candidates,
    kmeans,
    kmeans_plusplus,
    thompson_sample,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _model(num_classes: int = 3) -> SmallCNN:
    torch.manual_seed(0)
    model = SmallCNN(num_classes=num_classes, in_channels=1, width=4)
    model.train()
    return model


# --------------------------------------------------------------------------------------------- k-means
def test_kmeans_recovers_separated_blobs_like_sklearn():
    x, truth = make_blobs(n_samples=300, centers=6, n_features=5, cluster_std=0.4, center_box=(-20, 20), random_state=3)
    labels, centers = kmeans(torch.tensor(x, dtype=torch.float32), 6, n_init=3, generator=_gen(0))
    reference = KMeans(6, n_init=3, random_state=0).fit(x).labels_
    assert adjusted_rand_score(reference, labels.numpy()) == 1.0
    assert adjusted_rand_score(truth, labels.numpy()) == 1.0
    assert centers.shape == (6, 5)
    for c in range(6):  # every center is the mean of its members
        torch.testing.assert_close(centers[c], torch.tensor(x)[labels == c].mean(0).float(), atol=1e-4, rtol=1e-4)


def test_kmeans_is_deterministic_given_the_generator():
    x = torch.randn(200, 8, generator=_gen(1))
    a = kmeans(x, 10, generator=_gen(5))
    b = kmeans(x, 10, generator=_gen(5))
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)


def test_kmeans_inertia_is_close_to_sklearn_on_unstructured_data():
    x = torch.randn(384, 16, generator=_gen(2))
    x = x / x.norm(dim=1, keepdim=True)
    labels, centers = kmeans(x, 32, n_init=3, generator=_gen(0))
    ours = ((x - centers[labels]) ** 2).sum()
    theirs = KMeans(32, n_init=3, random_state=0).fit(x.numpy()).inertia_
    assert ours <= 1.05 * theirs


def test_kmeans_handles_duplicates_extreme_k_and_half_precision():
    x = torch.tensor([[0.0, 0.0]] * 5 + [[1.0, 1.0]] * 3)
    labels, centers = kmeans(x, 4, generator=_gen(0))  # only two distinct points: some clusters coincide
    assert labels.min() >= 0
    assert labels.max() < 4
    assert torch.isfinite(centers).all()
    assert len(set(labels[:5].tolist()) & set(labels[5:].tolist())) == 0
    y = torch.randn(10, 3, generator=_gen(1))
    assert kmeans(y, 1)[0].eq(0).all()
    assert sorted(kmeans(y, 10, generator=_gen(0))[0].tolist()) == list(range(10))
    assert kmeans(y.half(), 3, generator=_gen(0))[1].dtype == torch.float32
    with pytest.raises(ValueError, match="1 <= k <= N"):
        kmeans(y, 11)


# --------------------------------------------------------------------------------------------- selection
def _brute_force_extremes(scores, labels, per_cluster, two_way):
    picked = set()
    for c in labels.unique():
        members = sorted((labels == c).nonzero().flatten().tolist(), key=lambda i: scores[i].item())
        picked.update(members[:per_cluster])
        if two_way:
            picked.update(members[-per_cluster:])
    return sorted(picked)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 60),
    k=st.integers(1, 12),
    per_cluster=st.integers(1, 3),
    two_way=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_cluster_extremes_matches_brute_force(n, k, per_cluster, two_way, seed):
    gen = _gen(seed)
    scores = torch.randn(n, generator=gen)
    labels = torch.randint(k, (n,), generator=gen) * 7 - 3  # arbitrary, non-contiguous label values
    got = cluster_extremes(scores, labels, per_cluster, two_way)
    assert got.tolist() == _brute_force_extremes(scores, labels, per_cluster, two_way)


@settings(max_examples=15, deadline=None)
@given(
    n_id=st.integers(2, 24),
    ratio=st.integers(1, 6),
    num_clusters=st.integers(1, 16),
    two_way=st.booleans(),
    trim=st.integers(0, 5),
    representation=st.sampled_from(["norm", "norm_feature", "norm_batch"]),
    seed=st.integers(0, 1000),
)
def test_cluster_select_takes_every_cluster_extreme_then_fills(
    n_id, ratio, num_clusters, two_way, trim, representation, seed
):
    n = n_id * ratio
    gen = _gen(seed)
    feats, scores = torch.randn(n, 6, generator=gen), torch.randn(n, generator=gen)
    keep_start, keep_end = min(trim, n - 1), None if trim % 2 else n - trim // 2
    idx = cluster_select(
        feats, scores, n_id, num_clusters, 2, two_way, 50, keep_start, keep_end, _gen(seed), representation
    )

    kept = torch.argsort(scores)[keep_start:keep_end]
    assert len(idx) == min(len(kept), n_id * (2 if two_way else 1))
    if len(kept) == 0:
        return
    assert len(set(idx.tolist())) == len(idx)
    assert set(idx.tolist()) <= set(kept.tolist())
    # Brute-force reference with the same k-means (same generator seed, same inputs). The official --repr
    # normalizations run over all candidates, before the energy slice.
    points = {
        "norm": feats / feats.pow(2).sum(1, keepdim=True).sqrt(),
        "norm_feature": feats / feats.pow(2).sum(0, keepdim=True).sqrt(),
        "norm_batch": feats / feats.pow(2).sum(1).sqrt().mean(),
    }[representation]
    k = min(num_clusters, n_id, len(kept))
    labels, _ = kmeans(points[kept], k, 2, 50, generator=_gen(seed))
    extremes = kept[_brute_force_extremes(scores[kept], labels, max(1, n_id // k), two_way)]
    assert idx[: len(extremes)].sort().values.tolist() == extremes.sort().values.tolist()


def test_energy_cluster_keeps_lowest_and_highest_energy_of_each_cluster():
    # Three tight direction clusters; energies make the extremes of each cluster unambiguous.
    gen = _gen(0)
    dirs = torch.eye(3, 5)
    feats = torch.cat([d + 0.01 * torch.randn(8, 5, generator=gen) for d in dirs])
    scores = torch.arange(24.0)
    idx = cluster_select(feats, scores, n_id=3, num_clusters=3, two_way=True, generator=_gen(0))
    assert sorted(idx.tolist()) == [0, 7, 8, 15, 16, 23]
    idx = cluster_select(feats, scores, n_id=3, num_clusters=3, two_way=False, generator=_gen(0))
    assert sorted(idx.tolist()) == [0, 8, 16]


@pytest.mark.parametrize(
    ("representation", "invariant_to", "changed_by"),
    [("norm", "rows", "columns"), ("norm_feature", "columns", "rows"), ("norm_batch", "all", "rows")],
)
def test_cluster_representation_ignores_its_own_scaling(representation, invariant_to, changed_by):
    # Powers of two scale exactly, so an invariant selection is bit-identical; the other scaling must change it.
    gen = _gen(4)
    feats, scores = torch.randn(48, 6, generator=gen), torch.randn(48, generator=gen)
    scales = {
        "rows": 2.0 ** torch.randint(-4, 5, (48, 1), generator=gen),
        "columns": 2.0 ** torch.randint(-4, 5, (1, 6), generator=gen),
        "all": torch.tensor(2.0**-5),
    }

    def select(x):
        return cluster_select(x, scores, 8, 8, 3, True, generator=_gen(1), representation=representation).tolist()

    assert select(feats * scales[invariant_to]) == select(feats)
    assert select(feats * scales[changed_by]) != select(feats)


# --------------------------------------------------------------------------------------------- samplers
@pytest.mark.parametrize("name", SAMPLERS.names())
def test_sampler_contract(name):
    model = _model()
    sampler = SAMPLERS.build({"name": name, **({"score": "energy"} if name in ("dos", "ntom") else {})})
    candidates = torch.randn(24, 1, 8, 8, generator=_gen(0))
    model.bn_frozen = torch.nn.BatchNorm1d(2).eval()  # a module deliberately in eval mode stays so
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    idx = sampler.select(model, candidates, n_id=4)
    assert idx.dtype == torch.int64
    assert idx.device == candidates.device
    assert len(set(idx.tolist())) == len(idx)
    assert idx.min() >= 0
    assert idx.max() < 24
    assert model.training
    assert not model.bn_frozen.training
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():  # BatchNorm running statistics untouched
        torch.testing.assert_close(v, buffers[k], rtol=0, atol=0)


def test_random_sampler_returns_all_candidates():
    idx = SAMPLERS.build("random").select(_model(), torch.zeros(7, 1, 8, 8), n_id=3)
    assert idx.tolist() == list(range(7))


def test_energy_cluster_sampler_sizes_and_determinism():
    model, cand = _model(), torch.randn(36, 1, 8, 8, generator=_gen(1))
    a, b = EnergyClusterSampler(num_clusters=4, seed=3), EnergyClusterSampler(num_clusters=4, seed=3)
    first = [a.select(model, cand, n_id=6) for _ in range(3)]
    assert all(len(i) == 12 for i in first)
    assert [i.tolist() for i in first] == [b.select(model, cand, n_id=6).tolist() for _ in range(3)]
    assert len(EnergyClusterSampler(two_way=False).select(model, cand, n_id=6)) == 6
    # The per-call counter is the state: a restored sampler continues the same sequence.
    assert a.state_dict() == {"calls": 3}
    c = EnergyClusterSampler(num_clusters=4, seed=3)
    c.load_state_dict({"calls": 1})
    assert c.select(model, cand, n_id=6).tolist() == first[1].tolist()


@pytest.mark.parametrize(
    ("keep_start", "keep_end", "two_way", "n_id"),
    [(0, None, True, 8), (16, None, True, 16), (0, 20, True, 16), (5, 30, False, 30), (39, None, False, 4)],
)
def test_energy_cluster_num_selected_counts_the_kept_slice(keep_start, keep_end, two_way, n_id):
    # The influence report sizes the training batch by num_selected: it must say what select returns.
    model, cand = _model(), torch.randn(40, 1, 8, 8, generator=_gen(7))
    sampler = EnergyClusterSampler(num_clusters=4, keep_start=keep_start, keep_end=keep_end, two_way=two_way)
    assert sampler.num_selected(n_id, 40) == len(sampler.select(model, cand, n_id, generator=_gen(0)))


def test_energy_cluster_selection_uses_model_energy_and_features():
    model, cand = _model(), torch.randn(30, 1, 8, 8, generator=_gen(2))
    feats, logits = forward_candidates(model, cand)
    expected = cluster_select(feats, energy(logits), 5, 64, 3, True, 100, 0, None, _gen(9))
    got = EnergyClusterSampler().select(model, cand, n_id=5, generator=_gen(9))
    assert got.tolist() == expected.tolist()


def test_energy_scores_leave_out_the_absent_logit():
    # GReg+ (or an energy-scored DOS) on a method-absent model: the energy of the K ID logits, as the scorers use.
    model, cand = _model(), torch.randn(30, 1, 8, 8, generator=_gen(4))
    add_absent_head(model)
    with torch.no_grad():
        model.absent_fc.weight.mul_(50)  # an absent logit that dominates the log-sum-exp
    feats, logits = forward_candidates(model, cand)
    assert logits.shape[1] == 4
    expected = cluster_select(feats, energy(logits[:, :3]), 5, 4, 3, False, 100, 0, None, _gen(9))
    with_absent = cluster_select(feats, energy(logits), 5, 4, 3, False, 100, 0, None, _gen(9))
    assert expected.tolist() != with_absent.tolist()  # the case tells the two apart
    got = EnergyClusterSampler(num_clusters=4, two_way=False).select(model, cand, n_id=5, generator=_gen(9))
    assert got.tolist() == expected.tolist()
    expected = cluster_select(feats, energy(logits[:, :3]), 5, 4, 5, False, generator=_gen(1))
    got = DOSSampler(num_clusters=4, score="energy").select(model, cand, n_id=5, generator=_gen(1))
    assert got.tolist() == expected.tolist()


def test_dos_score_auto_needs_num_classes_and_reads_the_absent_class():
    model, cand = _model(num_classes=4), torch.randn(20, 1, 8, 8, generator=_gen(3))
    with pytest.raises(ValueError, match="num_classes"):
        DOSSampler().select(model, cand, n_id=4)
    sampler = DOSSampler(num_clusters=2)
    sampler.setup(num_classes=3)  # 4 outputs = 3 classes + absent
    _, logits = forward_candidates(model, cand)
    expected = cluster_select(
        forward_candidates(model, cand)[0], torch.softmax(logits, 1)[:, -1], 4, 2, 5, False, generator=_gen(1)
    )
    assert sampler.select(model, cand, n_id=4, generator=_gen(1)).tolist() == expected.tolist()
    with pytest.raises(RegistryError, match="valid"):
        SAMPLERS.build({"name": "dos", "clusters": 3})


class _Pool(Dataset):
    """Images whose constant pixel value sets the model's score; items ``(index, augmentation seed)`` give
    ``(x, index)`` (the augmentation seed is ignored: no augmentation)."""

    def __init__(self, n: int) -> None:
        self.values = torch.randperm(n, generator=_gen(0)).float() / n

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, item: tuple[int, int]):
        i, _ = item
        return torch.full((1, 2, 2), float(self.values[i])), i


class _PixelModel(torch.nn.Module):
    """Two logits [0, 10 * mean pixel]: the absent-class probability grows with the pixel value."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(1, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[0.0], [10.0]]))
            self.fc.bias.zero_()

    def features(self, x):
        return x.flatten(1).mean(1, keepdim=True)

    def forward(self, x):
        return self.fc(self.features(x))


def test_ntom_skips_the_hardest_quantile_and_keeps_the_next_block():
    pool = _Pool(80)
    sampler = NTOMSampler(quantile=0.25, pool_factor=4, keep_factor=1, id_train_size=20, score="absent")
    kept = sampler.mine(_PixelModel(), pool)  # scans the whole pool (4 x 20), skips the 20 hardest, keeps 20
    values = pool.values[kept]
    expected = pool.values.sort().values[20:40]
    torch.testing.assert_close(values, expected)

    stream = OutlierStream(pool, batch_size=4, seed=0)
    assert NTOMSampler.per_epoch
    sampler.on_train_epoch_start(_PixelModel(), pool, stream, batch_size=4)
    drawn = torch.cat([stream.batch_indices(p) for p in range(10)])
    assert set(drawn.tolist()) <= set(kept.tolist())


def test_mining_scans_the_same_augmentations_with_any_number_of_workers():
    spec = ImageSpec(num_classes=3, size=8, channels=1, mean=(0.5,), std=(0.5,))
    images = torch.rand(60, 1, 8, 8, generator=_gen(5))
    pool = Transformed(ArrayDataset(images, torch.zeros(60)), build_transform(spec, "crop"), return_index=True)

    def mine(num_workers: int) -> list[int]:
        sampler = NTOMSampler(pool_factor=2, keep_factor=1, id_train_size=20, score="energy", batch_size=8)
        sampler.num_workers = num_workers
        return sampler.mine(_model(), pool, position=3).tolist()

    assert mine(2) == mine(0)


def test_ntom_mining_is_deterministic_and_leaves_the_global_rng_alone():
    pool, model = _Pool(50), _PixelModel()
    sampler = NTOMSampler(pool_factor=2, keep_factor=1, id_train_size=10, score="energy")
    state = torch.random.get_rng_state()
    a = sampler.mine(model, pool, position=7)
    assert torch.equal(state, torch.random.get_rng_state())
    assert a.tolist() == sampler.mine(model, pool, position=7).tolist()
    assert len(a) == 10


def test_kmeans_plusplus_gives_the_same_seeds_without_the_pairwise_table(monkeypatch):
    x = torch.randn(120, 5, generator=_gen(4), dtype=torch.float64)
    with_table = kmeans_plusplus(x, 9, n_init=2, generator=_gen(1))
    monkeypatch.setattr(gradreg.kmeans, "PAIRWISE_MAX", 0)
    torch.testing.assert_close(kmeans_plusplus(x, 9, n_init=2, generator=_gen(1)), with_table, rtol=0, atol=0)


def test_kmeans_plusplus_draws_by_squared_distance_by_hand():
    # first center: point floor(0.0 * 3) = 0; squared distances [0, 1, 9], cdf [0, 1, 10]: 0.2 * 10 = 2 falls on
    # point 2 (by distance, [0, 1, 3], cdf [0, 1, 4]: 0.8 would fall on point 1)
    x = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64)
    centers = gradreg.kmeans._seed_centers(x, torch.tensor([[[0.0], [0.2]]], dtype=torch.float64))
    assert centers[0, :, 0].tolist() == [0.0, 3.0]


def test_lloyd_moves_the_jth_empty_cluster_to_the_jth_farthest_point():
    # every point is nearest to 5; their squared distances to it: 25, 16, 9, 36 -> farthest 11, then 0
    x = torch.tensor([[0.0], [1.0], [2.0], [11.0]], dtype=torch.float64)
    centers = torch.tensor([[[5.0], [100.0], [200.0]]], dtype=torch.float64)
    labels = torch.full((1, 4), -1)
    new, _, _ = gradreg.kmeans._lloyd(x, torch.tensor(0.0), centers, labels, torch.zeros(1, dtype=torch.bool), 1)
    assert new[0, :, 0].tolist() == [3.5, 11.0, 0.0]


def test_kmeans_keeps_the_restart_of_lowest_inertia(monkeypatch):
    # restart 0 seeds one center per blob; restart 1 both in the first blob, and one Lloyd step leaves it at
    # (0, 6.73) with an inertia of about 22 against 0.01
    x = torch.tensor([[0.0], [0.1], [10.0], [10.1]], dtype=torch.float64)
    u = torch.tensor([[[0.0, 0.0], [0.9, 0.9]], [[0.0, 0.0], [1e-5, 1e-5]]], dtype=torch.float64)
    monkeypatch.setattr(gradreg.kmeans, "_uniforms", lambda *args, **kwargs: u)
    _, centers = gradreg.kmeans.kmeans(x, 2, n_init=2, max_iter=1)
    torch.testing.assert_close(centers[:, 0].sort().values, torch.tensor([0.05, 10.05], dtype=torch.float64))


def test_kmeans_result_does_not_depend_on_how_often_the_host_checks():
    x = torch.nn.functional.normalize(torch.randn(300, 12, generator=_gen(6)), dim=1)
    a = kmeans(x, 24, generator=_gen(2), check_every=1)
    for every in (3, 7, 100):
        b = kmeans(x, 24, generator=_gen(2), check_every=every)
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
        torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)


def _greedy_kmeans_plusplus(x: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Textbook greedy k-means++ (one restart) on points ``x`` (N, D) driven by ``u`` (k, L): the first center is point
    floor(u[0, 0] N); each next one the candidate of lowest potential among L drawn by inverse CDF of D^2 (the first
    point whose cumulative D^2 exceeds u times the total)."""
    n = len(x)
    chosen = [min(int(u[0, 0] * n), n - 1)]
    closest = ((x - x[chosen[0]]) ** 2).sum(1)
    for c in range(1, len(u)):
        cdf, best = np.cumsum(closest), None
        for t in range(u.shape[1]):
            i = next((j for j in range(n) if cdf[j] > u[c, t] * cdf[-1]), n - 1)
            potential = np.minimum(closest, ((x - x[i]) ** 2).sum(1))
            if best is None or potential.sum() < best[1].sum():
                best = (i, potential)
        chosen.append(best[0])
        closest = best[1]
    return x[chosen]


@pytest.mark.parametrize("table", [True, False])
def test_kmeans_plusplus_seeds_match_a_plain_reference(monkeypatch, table):
    # Integer coordinates: every squared distance and cumulative sum is exact in float64, so the choices must agree.
    if not table:
        monkeypatch.setattr(gradreg.kmeans, "PAIRWISE_MAX", 0)
    gen = _gen(11)
    for trial in range(6):
        n, k, trials = 12 + 7 * trial, 2 + trial, 1 + trial % 3
        x = torch.randint(-20, 21, (n, 3), generator=gen).double()
        u = torch.rand(2, k, trials, generator=gen, dtype=torch.float64)
        got = gradreg.kmeans._seed_centers(x, u)
        for r in range(2):
            np.testing.assert_array_equal(got[r].numpy(), _greedy_kmeans_plusplus(x.numpy(), u[r].numpy()))


def test_kmeans_plusplus_by_hand_three_centers_and_two_trials():
    # x = 0, 1, 3, 10; first center 0: D^2 = [0, 1, 9, 100], cdf [0, 1, 10, 110].
    x = torch.tensor([[0.0], [1.0], [3.0], [10.0]], dtype=torch.float64)
    # One trial each: 0.5 * 110 = 55 -> point 10; D^2 then [0, 1, 9, 0], cdf [0, 1, 10, 10]: 0.5 * 10 = 5 -> point 3.
    one = torch.tensor([[[0.0], [0.5], [0.5]]], dtype=torch.float64)
    assert gradreg.kmeans._seed_centers(x, one)[0, :, 0].tolist() == [0.0, 10.0, 3.0]
    # Two trials: 0.05 * 110 = 5.5 -> point 3 (potential 0 + 1 + 0 + 49 = 50), 0.5 -> point 10 (potential 10): 10 wins.
    two = torch.tensor([[[0.0, 0.0], [0.05, 0.5]]], dtype=torch.float64)
    assert gradreg.kmeans._seed_centers(x, two)[0, :, 0].tolist() == [0.0, 10.0]
    # u = 0 (torch.rand can draw it) must not fall on point 0, the center already chosen (probability 0): point 1.
    zero = torch.tensor([[[0.0], [0.0]]], dtype=torch.float64)
    assert gradreg.kmeans._seed_centers(x, zero)[0, :, 0].tolist() == [0.0, 1.0]


def test_kmeans_plusplus_first_center_is_uniform_over_the_points():
    # k-means++ draws its first center uniformly: each of 3 points about a third of 3000 seedings, the last one too.
    x = torch.tensor([[0.0], [1.0], [2.0]])
    first = kmeans_plusplus(x, 1, n_init=3000, generator=_gen(3))[:, 0, 0]
    counts = torch.bincount(first.long(), minlength=3).double() / 3000
    torch.testing.assert_close(counts, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.04, rtol=0)


def test_kmeans_plusplus_default_trials_are_two_plus_log_k():
    # scikit-learn's default number of local trials: 2 + floor(ln k), 4 for k = 8 (log2 would give 5, ln - 1 gives 3)
    x = torch.randn(200, 4, generator=_gen(7), dtype=torch.float64)
    default = kmeans_plusplus(x, 8, n_init=2, generator=_gen(1))
    for trials in (3, 5):
        assert not torch.equal(kmeans_plusplus(x, 8, n_init=2, generator=_gen(1), local_trials=trials), default)
    explicit = kmeans_plusplus(x, 8, n_init=2, generator=_gen(1), local_trials=2 + int(np.log(8)))
    torch.testing.assert_close(explicit, default, rtol=0, atol=0)


def test_kmeans_plusplus_draws_the_same_numbers_in_every_dtype():
    # The draw is made in float64 whatever the points' dtype: float32 points get the seeds of their float64 copy.
    x = torch.randint(-50, 51, (150, 3), generator=_gen(8)).double()
    seeds64 = kmeans_plusplus(x, 6, n_init=3, generator=_gen(2))
    seeds32 = kmeans_plusplus(x.float(), 6, n_init=3, generator=_gen(2))
    assert seeds32.dtype == torch.float32
    torch.testing.assert_close(seeds32.double(), seeds64, rtol=0, atol=0)
    labels64, centers64 = kmeans(x, 6, generator=_gen(2))
    labels32, centers32 = kmeans(x.float(), 6, generator=_gen(2))
    assert centers64.dtype == torch.float64  # float64 stays float64
    torch.testing.assert_close(labels32, labels64, rtol=0, atol=0)
    torch.testing.assert_close(centers32.double(), centers64, rtol=1e-6, atol=1e-5)


def _sklearn_lloyd_runs(x: torch.Tensor, k: int, n_init: int, seed: int, **kwargs) -> list[KMeans]:
    """scikit-learn's Lloyd from each of the ``n_init`` seedings that ``kmeans_plusplus`` draws with ``_gen(seed)``."""
    seeds = kmeans_plusplus(x, k, n_init=n_init, generator=_gen(seed))
    return [KMeans(k, init=s.numpy(), n_init=1, algorithm="lloyd", **kwargs).fit(x.numpy()) for s in seeds]


@pytest.mark.parametrize(
    ("tol", "max_iter", "check_every"),
    [(0.0, 300, 5), (1e-4, 300, 5), (1e-2, 300, 3), (0.1, 300, 1), (0.0, 7, 5), (0.0, 3, 2)],
)
def test_kmeans_is_the_best_of_sklearn_lloyd_runs_from_its_seeds(tol, max_iter, check_every):
    # Reference: scikit-learn's Lloyd (same stopping rule: labels unchanged, or squared center shift <= tol times the
    # mean feature variance; at most max_iter iterations) from each of the seedings kmeans_plusplus draws with the
    # same generator, and the one of lowest inertia. Overlapping data: many iterations, no empty cluster.
    x = torch.randn(240, 5, generator=_gen(12), dtype=torch.float64) * torch.tensor([3.0, 2.0, 1.0, 0.5, 0.2])
    runs = _sklearn_lloyd_runs(x, 7, 4, 3, max_iter=max_iter, tol=tol)
    ref = min(runs, key=lambda run: run.inertia_)
    stops = [run.n_iter_ for run in runs]
    # converged: the restarts stop at different iterations; else all run to max_iter (not a multiple of check_every)
    assert len(set(stops)) > 1 if max_iter == 300 else set(stops) == {max_iter}
    labels, centers = kmeans(x, 7, n_init=4, max_iter=max_iter, tol=tol, generator=_gen(3), check_every=check_every)
    np.testing.assert_array_equal(labels.numpy(), ref.labels_)
    np.testing.assert_allclose(centers.numpy(), ref.cluster_centers_, rtol=0, atol=1e-9)


@pytest.mark.parametrize(("seed", "n", "dim", "k", "check_every"), [(7, 67, 5, 4, 1), (12, 72, 2, 3, 6)])
def test_kmeans_restarts_stopped_by_the_tolerance_stay_stopped(seed, n, dim, k, check_every):
    # A restart whose center shift fell within the tolerance stops there (scikit-learn's rule), even where one more
    # Lloyd step would move it by more while the other restarts keep iterating. Reference as above.
    x = torch.randn(n, dim, generator=_gen(seed), dtype=torch.float64)
    ref = min(_sklearn_lloyd_runs(x, k, 4, seed, tol=0.05), key=lambda run: run.inertia_)
    labels, centers = kmeans(x, k, n_init=4, tol=0.05, generator=_gen(seed), check_every=check_every)
    np.testing.assert_array_equal(labels.numpy(), ref.labels_)
    np.testing.assert_allclose(centers.numpy(), ref.cluster_centers_, rtol=0, atol=1e-9)


def test_kmeans_keeps_the_restart_of_lowest_inertia_wherever_it_is(monkeypatch):
    # Three restarts on two blobs: seedings 0 and 2 put both centers in the first blob; one Lloyd step leaves them at
    # an inertia of about 22, seeding 1 (one center per blob) at 0.01: the centers 0.05 and 10.05 must come back.
    x = torch.tensor([[0.0], [0.1], [10.0], [10.1]], dtype=torch.float64)
    bad, good = [[0.0, 0.0], [1e-5, 1e-5]], [[0.0, 0.0], [0.9, 0.9]]
    for order in ([bad, good, bad], [bad, bad, good]):
        u = torch.tensor(order, dtype=torch.float64)
        monkeypatch.setattr(gradreg.kmeans, "_uniforms", lambda *args, u=u, **kwargs: u)
        _, centers = gradreg.kmeans.kmeans(x, 2, n_init=3, max_iter=1)
        torch.testing.assert_close(centers[:, 0].sort().values, torch.tensor([0.05, 10.05], dtype=torch.float64))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 0}, "1 <= k <= N"),
        ({"n_init": 0}, "n_init, max_iter, check_every >= 1"),
        ({"max_iter": 0}, "n_init, max_iter, check_every >= 1"),
        ({"check_every": 0}, "n_init, max_iter, check_every >= 1"),
    ],
)
def test_kmeans_refuses_non_positive_counts(kwargs, message):
    x = torch.randn(10, 3, generator=_gen(1))
    with pytest.raises(ValueError, match=message):
        kmeans(x, **{"k": 2, **kwargs})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kmeans_cuda_graph_matches_the_eager_path():
    x = torch.nn.functional.normalize(torch.randn(384, 128, device="cuda"), dim=1)
    for seed in range(3):
        eager = kmeans(x, 64, generator=torch.Generator("cuda").manual_seed(seed), cuda_graph=False)
        graph = kmeans(x, 64, generator=torch.Generator("cuda").manual_seed(seed), cuda_graph=True)
        torch.testing.assert_close(graph[0], eager[0], rtol=0, atol=0)
        torch.testing.assert_close(graph[1], eager[1])


# --------------------------------------------------------------------------------------------- POEM
def _observe_epochs(sampler: POEMSampler, epochs: int, dim: int = 5, seed: int = 0) -> list[tuple[np.ndarray, ...]]:
    """Feed ``epochs`` epochs of two steps each (float64 features); returns each epoch's (Z_id, Z_out)."""
    gen, rows = _gen(seed), []
    for e in range(epochs):
        z_id = torch.randn(2, 7, dim, generator=gen, dtype=torch.float64) + 1.0
        z_out = torch.randn(2, 5, dim, generator=gen, dtype=torch.float64) - 1.0 + 0.1 * e
        for step in range(2):
            sampler.observe(z_id[step], z_out[step])
        sampler.close_epoch()
        rows.append((z_id.reshape(-1, dim).numpy(), z_out.reshape(-1, dim).numpy()))
    return rows


def _closed_form(rows, conf, noise, sigma, sigma_n):
    z = np.concatenate([np.concatenate(r) for r in rows])
    y = np.concatenate([np.r_[np.full(len(zi), -conf + noise), np.full(len(zo), conf + noise)] for zi, zo in rows])
    a = z.T @ z / sigma_n + np.eye(z.shape[1]) / sigma
    return np.linalg.solve(a, z.T @ y / sigma_n), sigma * np.linalg.inv(a)


def test_poem_posterior_matches_the_closed_form_over_the_last_epochs():
    sampler = POEMSampler(conf=2.5, sigma=10.0, sigma_n=0.3, buffer_epochs=2, seed=4)
    mu, cov = sampler.posterior(5)  # before any data: the prior
    torch.testing.assert_close(mu, torch.zeros(5, dtype=torch.float64), rtol=0, atol=0)
    torch.testing.assert_close(cov, 10.0 * torch.eye(5, dtype=torch.float64), rtol=1e-12, atol=1e-12)

    rows = _observe_epochs(sampler, epochs=3)
    noise = sampler.label_noise
    assert noise != 0.0
    assert noise == POEMSampler(sigma_n=0.3, seed=4).label_noise  # one draw per run, from the seed
    expected_mu, expected_cov = _closed_form(rows[-2:], 2.5, noise, 10.0, 0.3)  # only the last 2 epochs
    mu, cov = sampler.posterior(5)
    np.testing.assert_allclose(mu.numpy(), expected_mu, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(cov.numpy(), expected_cov, rtol=1e-10, atol=1e-12)
    assert mu @ torch.ones(5, dtype=torch.float64) < 0  # ID features (around +1) get negative targets


def test_poem_thompson_sample_has_the_posterior_moments_and_survives_round_off():
    mu = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    root = torch.tensor([[1.0, 0.0, 0.0], [0.5, 2.0, 0.0], [0.0, -0.3, 0.2]], dtype=torch.float64)
    cov = root @ root.T
    gen = _gen(0)
    draws = torch.stack([thompson_sample(mu, cov, gen) for _ in range(4000)])
    torch.testing.assert_close(draws.mean(0), mu, atol=0.1, rtol=0)
    torch.testing.assert_close(torch.cov(draws.T), cov, atol=0.15, rtol=0.05)
    assert torch.equal(thompson_sample(mu, cov, _gen(1)), thompson_sample(mu, cov, _gen(1)))
    singular = torch.tensor([[1.0, 1.0], [1.0, 1.0 - 1e-12]], dtype=torch.float64)  # an eigenvalue just below 0
    assert torch.isfinite(thompson_sample(torch.zeros(2, dtype=torch.float64), singular, _gen(0))).all()


def test_poem_thompson_sample_uses_the_unique_symmetric_root():
    # V diag(sqrt(lambda)) eps depended on the signs eigh gives the eigenvectors (LAPACK and cuSOLVER differ), so one
    # seed drew another beta on a GPU; the symmetric root (scipy's sqrtm as reference) has no such freedom.
    mu = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)
    root = torch.randn(4, 4, generator=_gen(3), dtype=torch.float64)
    cov = root @ root.T + 0.5 * torch.eye(4, dtype=torch.float64)
    eps = torch.randn(4, generator=_gen(7), dtype=torch.float64)
    expected = mu + torch.from_numpy(np.real(scipy.linalg.sqrtm(cov.numpy()))) @ eps
    torch.testing.assert_close(thompson_sample(mu, cov, _gen(7)), expected, rtol=1e-10, atol=1e-10)
    # a repeated eigenvalue (the prior sigma I, the first epoch's draw) leaves even the eigenvectors free
    torch.testing.assert_close(thompson_sample(mu, 4 * torch.eye(4, dtype=torch.float64), _gen(7)), mu + 2 * eps)


class _VectorPool(Dataset):
    """Items ``(index, augmentation seed)`` give (a 3-vector "image", index); the model's features are the vector."""

    def __init__(self, n: int) -> None:
        self.z = torch.randn(n, 3, generator=_gen(1))

    def __len__(self) -> int:
        return len(self.z)

    def __getitem__(self, item: tuple[int, int]):
        i, _ = item
        return self.z[i], i


class _IdentityFeatures(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 2)

    def features(self, x):
        return x

    def forward(self, x):
        return self.fc(x)


def test_poem_keeps_exactly_the_smallest_abs_beta_z_and_restricts_the_stream():
    pool, model = _VectorPool(64), _IdentityFeatures()
    sampler = POEMSampler(pool_factor=4, keep_factor=1, id_train_size=16, batch_size=10, seed=2)
    _observe_epochs(sampler, epochs=1, dim=3)
    beta = sampler.sample_beta(3, position=5)
    assert torch.equal(beta, sampler.sample_beta(3, position=5))
    assert not torch.equal(beta, sampler.sample_beta(3, position=6))
    kept = sampler.mine(model, pool, position=5)  # the window (4 x 16) is the whole pool
    brute_force = torch.argsort((pool.z.double() @ beta).abs())[:16]
    assert kept.tolist() == brute_force.tolist()

    stream = OutlierStream(pool, batch_size=4, seed=0)
    assert POEMSampler.per_epoch
    assert POEMSampler.needs_features
    sampler.observe(torch.randn(4, 3), torch.randn(4, 3))  # an open epoch: closed by the epoch start
    sampler.on_train_epoch_start(model, pool, stream, batch_size=4)
    assert len(sampler._closed) == 2
    assert sampler._open is None
    drawn = torch.cat([stream.batch_indices(p) for p in range(8)])
    assert set(drawn.tolist()) <= set(sampler.mine(model, pool, position=0).tolist())


def test_poem_state_dict_round_trip_restores_the_buffer(tmp_path):
    sampler = POEMSampler(buffer_epochs=3, seed=1)
    _observe_epochs(sampler, epochs=4)
    sampler.observe(torch.randn(3, 5), torch.randn(2, 5))  # a partial epoch (a mid-epoch checkpoint)
    torch.save(sampler.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["closed"]["gram"].shape == (3, 5, 5)
    restored = POEMSampler(buffer_epochs=3, seed=1)
    restored.load_state_dict(state)
    for a, b in zip(sampler.posterior(5), restored.posterior(5), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    restored.close_epoch(), sampler.close_epoch()
    torch.testing.assert_close(restored.posterior(5)[0], sampler.posterior(5)[0], rtol=0, atol=0)
    assert restored.state_dict()["closed"]["counts"][-1].tolist() == [3.0, 2.0]
    empty = POEMSampler()
    empty.load_state_dict(POEMSampler().state_dict())
    assert empty._closed == []
    assert empty._open is None
    with pytest.raises(SettingError, match=r"sigma_n=0.0 must be > 0.0"):
        POEMSampler(sigma_n=0.0)


class _SpyModule(GradRegModule):
    """Records the kept pool indices by the stream position they were mined at, and each epoch's drawn outliers."""

    def setup(self, stage: str) -> None:  # before the training loader exists: mining may come before on_fit_start
        super().setup(stage)
        self.kept, self.drawn = {}, {}
        mine = self.sampler.mine

        def record(model, pool, position=0):
            self.kept[position] = kept = mine(model, pool, position)
            return kept

        self.sampler.mine = record

    def training_step(self, batch, batch_idx):
        self.drawn.setdefault(self.current_epoch, []).extend(batch["outliers"][1].tolist())
        return super().training_step(batch, batch_idx)


def _mining_fit(
    tmp_path: Path, sampler: str, num_workers: int, schedule: str, ckpt_path: str | None = None, every_n_steps: int = 0
) -> tuple[_SpyModule, OODDataModule]:
    seed_everything(0)
    absent = sampler == "ntom"  # NTOM: the absent class, an outlier batch of twice the ID batch
    dm = OODDataModule(batch_size=32, outlier_batch_size=64 if absent else 32, augment="none", num_workers=num_workers)
    model = _SpyModule(
        arch="small_cnn", arch_kwargs={"in_channels": 1, "width": 8}, num_classes=dm.num_classes,
        method="absent" if absent else "energy", lr=0.05, schedule=schedule, input_mean=dm.input_mean,
        input_std=dm.input_std, sampler={"name": sampler, "keep_factor": 0.25, "pool_factor": 2, "batch_size": 128},
    )  # fmt: skip
    every = {"every_n_train_steps": every_n_steps} if every_n_steps else {"every_n_epochs": 1}
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}-{step}", save_top_k=-1, **every)
    trainer = Trainer(
        max_epochs=3, accelerator="cpu", devices=1, logger=False, callbacks=[ckpt], limit_val_batches=0,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model, dm


# With workers the outlier loader reads its first indices when its iterator exists: before on_train_epoch_start in a
# fit's first epoch, and with a cosine schedule before Lightning restores its loops. Those batches came from the
# whole pool (or the last epoch's block), and a resumed run drew different ones.
@pytest.mark.slow
@pytest.mark.parametrize(
    ("sampler", "num_workers", "schedule"), [("poem", 0, "constant"), ("poem", 1, "cosine"), ("ntom", 1, "constant")]
)
def test_per_epoch_mining_restricts_each_epoch_in_a_real_run_and_resumes_exactly(
    tmp_path, sampler: str, num_workers: int, schedule: str
):
    straight, dm = _mining_fit(tmp_path, sampler, num_workers, schedule)
    n_keep = round(0.25 * len(dm.id_dataset_for("train")))
    steps = len(straight.drawn[0]) // dm.outlier_batch_size
    starts = [0, steps, 2 * steps]
    assert sorted(straight.kept) == starts  # once an epoch, at its first position
    for epoch, start in enumerate(starts):
        assert len(straight.kept[start]) == n_keep
        assert set(straight.drawn[epoch]) <= set(straight.kept[start].tolist())
    assert straight.kept[0].tolist() != straight.kept[2 * steps].tolist()

    (end_of_epoch_1,) = tmp_path.glob("epoch=1-*.ckpt")
    resumed, _ = _mining_fit(tmp_path, sampler, num_workers, schedule, ckpt_path=str(end_of_epoch_1))
    assert sorted(resumed.kept) == [2 * steps]
    assert resumed.kept[2 * steps].tolist() == straight.kept[2 * steps].tolist()
    assert resumed.drawn == {2: straight.drawn[2]}
    if sampler == "poem":
        closed = straight.sampler._closed
        assert [c["counts"].tolist() for c in closed] == [[32.0 * steps, 32.0 * steps]] * 2
        assert straight.sampler._open["counts"].tolist() == [32.0 * steps, 32.0 * steps]
        for a, b in zip(resumed.sampler._closed, closed, strict=True):
            for key in a:
                torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


@pytest.mark.slow
def test_per_epoch_mining_resumed_inside_an_epoch_keeps_its_block(tmp_path):
    """The loader's hook does not mine at a position inside an epoch: the checkpoint holds that epoch's block."""
    straight, dm = _mining_fit(tmp_path, "ntom", 1, "constant", every_n_steps=25)
    steps = len(straight.drawn[0]) // dm.outlier_batch_size
    assert 25 - steps in range(1, steps)  # the checkpoint lies inside epoch 1
    (inside,) = tmp_path.glob("epoch=1-step=25.ckpt")
    resumed, _ = _mining_fit(tmp_path, "ntom", 1, "constant", ckpt_path=str(inside))
    assert sorted(resumed.kept) == [2 * steps]  # only at the start of epoch 2
    # The rest of epoch 1 draws from the checkpoint's block, and epoch 2 mines the uninterrupted run's block.
    assert resumed.drawn[1] == straight.drawn[1][(25 - steps) * dm.outlier_batch_size :]
    assert resumed.kept[2 * steps].tolist() == straight.kept[2 * steps].tolist()
    assert resumed.drawn[2] == straight.drawn[2]


def test_norm_feature_normalizes_over_all_candidates_before_the_energy_slice():
    # Official clusterAndChooseSamples normalizes each feature dimension over the whole candidate batch, then keeps
    # the [spt:ept] slice. Candidate 0 (lowest energy, dropped by keep_start=1) is huge in dimensions 1 and 2, so over
    # all candidates those dimensions shrink 100x and the kept points cluster by the sign of dimension 0 (A);
    # normalized over the kept points only they would cluster by the sign of dimensions 1-2 (B).
    signs = torch.tensor([[1, 1], [1, -1], [-1, 1], [-1, -1]] * 2, dtype=torch.float32)  # (A, B) of candidates 1..8
    kept = torch.cat([signs[:, :1], signs[:, 1:], signs[:, 1:]], dim=1)
    feats = torch.cat([torch.tensor([[0.0, 100.0, 100.0]]), kept])
    scores = torch.tensor([-10.0, 1, 2, 3, 4, 5, 6, 7, 8])
    idx = cluster_select(
        feats,
        scores,
        n_id=2,
        num_clusters=2,
        two_way=False,
        keep_start=1,
        generator=_gen(0),
        representation="norm_feature",
    )
    # clusters A+ = {1, 2, 5, 6}, A- = {3, 4, 7, 8}: their lowest-energy members ({1, 2} would be the B clusters')
    assert sorted(idx.tolist()) == [1, 3]


def test_setup_fills_only_the_settings_left_unset():
    given = SAMPLERS.build({"name": "ntom", "num_classes": 7, "id_train_size": 50})
    given.setup(num_classes=10, id_train_size=650)
    assert (given.num_classes, given.id_train_size) == (7, 50)  # the config's settings win
    unset = SAMPLERS.build("ntom")
    unset.setup(num_classes=10, id_train_size=650)
    assert (unset.num_classes, unset.id_train_size) == (10, 650)
    plain = SAMPLERS.build("random")
    plain.setup(num_classes=10, id_train_size=650)  # a sampler without such settings gains none
    assert not hasattr(plain, "num_classes")
    assert not hasattr(plain, "id_train_size")


def test_energy_cluster_seed_changes_the_k_means_draws():
    # 36 candidates of no cluster structure: k-means++ seeded differently ends in other clusters, other extremes
    model, cand = _model(), torch.randn(36, 1, 8, 8, generator=_gen(1))
    picks = {
        tuple(EnergyClusterSampler(num_clusters=6, seed=seed).select(model, cand, n_id=6).tolist()) for seed in range(4)
    }
    assert len(picks) > 1
