"""Outlier samplers: which auxiliary outliers of a candidate batch a training step uses.

A sampler gets the model and the step's candidate batch (drawn by :class:`gradreg.data.outliers.OutlierStream`)
and returns indices into the candidates; the LightningModule forwards ``cat([x_id, candidates[idx]])`` once.

- ``random`` (GReg, ``--noCluster``): every candidate, i.e. the next random outlier batch.
- ``energy_cluster`` (GReg+; Sharifi, Entesari, Safaei, Patel, Fazlyab, "Gradient-Regularized Out-of-Distribution
  Detection", ECCV 2024, arXiv:2404.12368; ``clusterAndChooseSamples`` in ``train_sea.py`` of
  github.com/o4lc/Greg-OOD): eval-mode forward of the candidates, energy ``-logsumexp(f)`` per candidate,
  optional trimming to the ``[keep_start:keep_end]`` slice of the energy-sorted candidates, k-means on the
  penultimate features (L2-normalized per candidate by default; ``--repr``: ``representation``) with
  ``k = min(num_clusters, n_id)``, per cluster the lowest-energy member (most ID-like) and, two-way, also the
  highest-energy one, then a uniformly random fill up to ``n_id`` (two-way: ``2 * n_id``) outliers.
- ``dos`` (Jiang, Han, Liu, Zhang, Zhu, "Diversified Outlier Exposure ...", ICLR 2024, arXiv:2306.02031;
  ``train_diverse.py`` of github.com/lygjwy/DOS): the same clustering, per cluster the member with the lowest
  absent-class probability (energy for K-way models), random fill to ``n_id``.
- ``ntom`` (Chen, Li, Wu, Liang, Jha, "ATOM: Robustifying Out-of-distribution Detection Using Outlier Mining",
  ECML-PKDD 2021, arXiv:2006.15207; github.com/jfc43/informative-outlier-mining): once per epoch, score a
  random window of ``pool_factor x keep`` pool images, sort by absent-class probability (low = hard), skip the
  hardest ``quantile`` of the window and keep the next ``keep = keep_factor x |ID train|``; the stream then
  draws only from those, and every candidate is used.
- ``poem`` (Ming, Fan, Li, "POEM: Out-of-Distribution Detection with Posterior Sampling", ICML 2022,
  arXiv:2206.13687; ``train_poem.py`` / ``neural_linear_opt.py`` of github.com/deeplearning-wisc/poem): once per
  epoch, Thompson-sample the weights ``beta`` of a Bayesian linear regression (targets ``-conf`` for ID,
  ``+conf`` for outlier features, fitted on the penultimate features of the last ``buffer_epochs`` epochs'
  training steps), score a random window of ``pool_factor x keep`` pool images by ``|beta . z|`` and keep the
  ``keep = keep_factor x |ID train|`` closest to the sampled boundary; then as ``ntom``.

Clustering uses :func:`gradreg.kmeans.kmeans`: torch k-means++ and Lloyd iterations on the features' device
(CUDA graphs on a GPU), never scikit-learn on the CPU per step.

Deviations from the official GReg code: the forward pass that scores the candidates (in eval mode under
``no_grad``, as there) restores each module's own train/eval flag afterwards (the official code calls
``model.train()``); ``max_iter`` defaults to 100 (scikit-learn: 300; the clusterings of 384 points converge long
before).
DOS's random fill and k-means seeds come from the sampler's generator, not from numpy's global state.
POEM's deviations from its official code are listed in :class:`POEMSampler`.

Determinism: the randomness of a selection (k-means seeding, random fill) comes from a generator on the
candidates' device seeded from ``(seed, number of select calls so far)``; the call counter is the sampler's
:meth:`~OutlierSampler.state_dict` (save it to resume exactly). ``select(..., generator=g)`` overrides it.
The stream (:mod:`gradreg.data.outliers`), not the sampler, guarantees that a resumed run sees the same
candidates, with the same augmentations (each candidate's augmentation is seeded by the stream).

Code: ``base.py`` (the :class:`OutlierSampler` interface, the registry, ``random``), ``cluster.py``
(``energy_cluster``, ``dos``), ``mining.py`` (``ntom``, ``poem``).
"""

from gradreg.kmeans import kmeans, kmeans_plusplus
from gradreg.samplers.base import SAMPLERS, OutlierSampler, RandomOutliers, forward_candidates
from gradreg.samplers.cluster import DOSSampler, EnergyClusterSampler, cluster_extremes, cluster_select
from gradreg.samplers.mining import NTOMSampler, POEMSampler, blr_posterior, thompson_sample

__all__ = [
    "SAMPLERS",
    "DOSSampler",
    "EnergyClusterSampler",
    "NTOMSampler",
    "OutlierSampler",
    "POEMSampler",
    "RandomOutliers",
    "blr_posterior",
    "cluster_extremes",
    "cluster_select",
    "forward_candidates",
    "kmeans",
    "kmeans_plusplus",
    "thompson_sample",
]
