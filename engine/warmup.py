"""The warm-up selector: COINCIDE's cluster-wise prototypes, as PROGRESS uses it.

Given the warm-up clustering (K=5000 by default, scaled to the pool) of the combined
dino+text features:
    1. transferability of cluster k = mean cosine of its centroid to the other
       centroids, ignoring those above 0.9 (near-duplicates of itself);
    2. density of cluster k = mean Gaussian kernel exp(-|x - y|^2 / (2 σ^2)), σ = 1,
       over all pairs of its members;
    3. score = transferability / density; shares = softmax(score / temperature),
       temperature 0.1: clusters that resemble many others and are diverse inside
       get more of the budget;
    4. quotas filled from the largest share down: each cluster takes
       round(left * share) (all of its rows if fewer), and the shares of the clusters
       not yet filled are renormalised over what is left, so a small cluster's
       shortfall flows on (``cluster_quotas``);
    5. inside a cluster, greedy MMD prototypes: the member whose addition brings the
       chosen set's kernel mean embedding closest to the cluster's (``mmd_prototypes``).

The reference (COINCIDE's ``cluster_wise_prune.py``) recomputes the MMD of every
candidate set from the kernel at each step, O(M^2 n) per step; the same greedy choice
is made here in O(n) per step by keeping running sums (``mmd_prototypes``' docstring).
Members beyond ``max_kernel_rows`` of one cluster are subsampled (seeded) before the
kernel, which bounds memory to max_kernel_rows^2 floats; the rest of a quota larger
than the subsample is drawn uniformly.
"""

from __future__ import annotations

import numpy as np


def transferability(centroids: np.ndarray, ignore_above: float = 0.9) -> np.ndarray:
    """float64 (K,): mean cosine of each centroid (K, d) to the others, those above
    ``ignore_above`` (itself included) left out; 0 where nothing is left."""
    c = np.asarray(centroids, np.float64)
    c = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    sim = c @ c.T
    keep = sim <= ignore_above
    counts = keep.sum(axis=1)
    return np.where(counts > 0, (sim * keep).sum(axis=1) / np.maximum(counts, 1), 0.0)


def gaussian_kernel(x: np.ndarray, y: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """float64 (n, m) exp(-|x_i - y_j|^2 / (2 sigma^2)) for x (n, d), y (m, d)."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    sq = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * (x @ y.T)
    return np.exp(-np.maximum(sq, 0.0) / (2.0 * sigma**2))


def mmd_prototypes(kernel: np.ndarray, m: int) -> np.ndarray:
    """Greedy MMD prototypes: int64 (min(m, n),) member positions in the order chosen.

    kernel: float (n, n) Gaussian kernel of one cluster's members.
    MMD^2(S) = mean(K) - 2 mean_{x, s in S} K(x, s) + mean_{s, s' in S} K(s, s');
    adding candidate c to S (size t) gives
    mean(K) - 2 (a_S + a_c) / (t + 1) + (b_S + 2 k_c + K(c, c)) / (t + 1)^2,
    with a = column means of K, a_S their sum over S, b_S the sum of K over S x S and
    k_c = sum_{s in S} K(c, s): all kept up to date, so a step costs O(n). A prefix of
    the order is the greedy selection of that size.
    """
    kernel = np.asarray(kernel, np.float64)
    n = kernel.shape[0]
    m = min(int(m), n)
    col_mean = kernel.mean(axis=0)
    diag = np.diag(kernel).copy()
    k_to_chosen = np.zeros(n)
    chosen = np.zeros(n, bool)
    a_sum = b_sum = 0.0
    order = np.empty(m, np.int64)
    for t in range(m):
        # mean(K) is the same for every candidate, so it drops out of the argmin.
        cost = -2.0 * (a_sum + col_mean) / (t + 1) + (b_sum + 2 * k_to_chosen + diag) / (t + 1) ** 2
        cost[chosen] = np.inf
        c = int(np.argmin(cost))
        order[t] = c
        chosen[c] = True
        a_sum += col_mean[c]
        b_sum += 2 * k_to_chosen[c] + diag[c]
        k_to_chosen += kernel[:, c]
    return order


def warmup_scores(centroids: np.ndarray, density: np.ndarray) -> np.ndarray:
    """float64 (K,) transferability / density: COINCIDE's cluster score."""
    return transferability(centroids) / np.maximum(np.asarray(density, np.float64), 1e-12)


def cluster_quotas(
    scores: np.ndarray, sizes: np.ndarray, total: int, temperature: float
) -> np.ndarray:
    """int64 (K,) rows to take from each cluster, summing to min(total, sizes.sum()).

    scores: float (K,) transferability / density; sizes: int (K,) rows per cluster.
    Clusters are filled in descending share; a cluster takes round(left * its share
    among the clusters not yet filled), capped by its size, and the shortfall passes
    on to the next. Whatever rounding leaves at the end goes to clusters with room,
    largest share first, so the total is exact.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    scores = np.asarray(scores, np.float64)
    sizes = np.asarray(sizes, np.int64)
    total = min(int(total), int(sizes.sum()))
    z = np.where(sizes > 0, scores / temperature, -np.inf)
    order = np.argsort(-z, kind="stable")
    quota = np.zeros(sizes.shape, np.int64)
    left = total
    for i, c in enumerate(order):
        if left <= 0 or sizes[c] == 0:
            break
        rest = z[order[i:]]
        share = 1.0 / np.exp(rest - z[c]).sum()  # softmax of c among the unfilled
        quota[c] = min(int(round(left * share)), int(sizes[c]), left)
        left -= quota[c]
    for c in order:
        if left <= 0:
            break
        extra = min(left, int(sizes[c] - quota[c]))
        quota[c] += extra
        left -= extra
    return quota


def cluster_order(
    features: np.ndarray,
    limit: int,
    sigma: float,
    max_kernel_rows: int,
    rng: np.random.Generator,
) -> tuple[float, np.ndarray]:
    """One cluster's density and the order its members are taken in, from one kernel.

    features: float32 (n, d) the cluster's members. Returns (density: the mean kernel
    over all pairs, order: int64 (min(limit, n),) member positions): greedy MMD
    prototypes first, then, once those run out, the members left out of the kernel in
    a seeded random order. Clusters above ``max_kernel_rows`` enter the kernel as a
    seeded subsample, which bounds memory to max_kernel_rows^2 float64. A quota q takes
    ``order[:q]``: a prefix of the greedy order is the greedy selection of that size.
    """
    n = features.shape[0]
    limit = min(int(limit), n)
    if n == 0:
        return 0.0, np.empty(0, np.int64)
    rows = np.arange(n)
    if n > max_kernel_rows:
        rows = np.sort(rng.choice(n, max_kernel_rows, replace=False))
    kernel = gaussian_kernel(features[rows], features[rows], sigma)
    order = rows[mmd_prototypes(kernel, limit)]
    if order.size < limit:
        rest = rng.permutation(np.setdiff1d(np.arange(n), rows))
        order = np.concatenate([order, rest[: limit - order.size]])
    return float(kernel.mean()), order.astype(np.int64)


def cluster_rng(seed: int, cluster: int) -> np.random.Generator:
    """The seeded stream of one warm-up cluster: the job draws it per cluster in parallel
    tasks, and :func:`select_warmup` the same, so both take the same rows."""
    return np.random.default_rng([seed, cluster])


def select_warmup(
    features: np.ndarray,
    labels: np.ndarray,
    centroids: np.ndarray,
    total: int,
    temperature: float = 0.1,
    sigma: float = 1.0,
    max_kernel_rows: int = 2048,
    seed: int = 0,
) -> np.ndarray:
    """The warm-up set of a pool held in memory: int64 (min(total, n),) row positions.

    features: float32 (n, d) unit rows; labels: int (n,) cluster in [0, K); centroids:
    float32 (K, d). The job runs the same steps cluster by cluster over the workspace.
    """
    labels = np.asarray(labels)
    k = centroids.shape[0]
    sizes = np.bincount(labels, minlength=k)
    members = [np.flatnonzero(labels == c) for c in range(k)]
    density, orders = np.zeros(k), []
    for c in range(k):
        rng = cluster_rng(seed, c)
        density[c], order = cluster_order(features[members[c]], total, sigma, max_kernel_rows, rng)
        orders.append(order)
    quotas = cluster_quotas(warmup_scores(centroids, density), sizes, total, temperature)
    picked = [members[c][orders[c][: quotas[c]]] for c in np.flatnonzero(quotas)]
    return np.sort(np.concatenate(picked)) if picked else np.empty(0, np.int64)
