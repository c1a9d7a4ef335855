"""Cross-rank analysis: is a benchmark dominated by its concepts or by its skills?

"Concepts or Skills?" (seeds/000) retrieves each benchmark sample's pool neighbours in
two spaces, concept (CLIP image) and skill (an LLM's skill description, embedded), and
predicts from how the two neighbour lists rank each other which space the benchmark
leans on. The paper's exact formula is not public; this module defines one, precisely.

Per benchmark sample i, with its concept list C_i and skill list S_i (pool rows, best
first, each ``depth`` long, scores float32), the competition rank of a pool row x
within a list L is

    rank_L(x) = 1 + #{y in L : score_L(y) > score_L(x) + tol}     (x in L)
              = depth_L + 1, censored                            (x not in L)

(``rank_within``; ``depth_L`` = the list's real entries). A rank counts only strictly
better items, so a tie group shares its best rank.

The "top-1" of a list is not one row but its whole top tie group,

    T_s(i) = {x in S_i : max_S_i score_s <= score_s(x) + tol},   n_s(i) = |T_s(i)|,

because skill descriptions repeat word for word (64 distinct texts for 2,000 pool
rows in the shapes world), equal texts have equal vectors, and the best skill score
is then shared by dozens of rows; which of them the index lists first is an accident
of storage order (on a real pool, of the source order). So

    R_c|s(i) = exp( (1 / n_s) * sum_{x in T_s(i)} log rank_C_i(x) ),

the geometric mean of the group's ranks in the concept list (its log is the expected
log-rank of the top-1 under a uniformly random tie-break among the tied top rows), a
float >= 1 that does not change when tied rows are reordered. It is *censored* (a lower bound) when any member is
absent from C_i; an empty S_i gives depth_c + 1, censored, n_s = 0. R_s|c(i)
symmetrically, from the top group T_c(i) of C_i (n_c members) ranked within S_i.
Without ties (n = 1) both are the integer rank of the single top row, exactly.

The aggregate over the benchmark is the median of the log-ranks,
``m_cs = median log R_c|s`` and ``m_sc = median log R_s|c``, and

    Δ = m_cs - m_sc.

Why medians of logs: ranks are heavy-tailed (1 for agreeing spaces, thousands for
disagreeing ones), the log makes a factor, not a difference, the unit, and the median
is exact under censoring as long as fewer than half of the ranks are censored (it
reads ``>= log(depth + 1)`` otherwise, which ``censored_*`` fractions report).

The reasoning behind the rule: in a benchmark that leans on a concept (a rare scene
domain, say), the concept neighbourhood of each sample is specific: the pool's best
*skill* match usually shows some other, common concept and falls deep in the concept
ranking (large R_c|s), while the concept neighbour, whose question is from the
general mix, is about as far in skill space as any random item. In a benchmark that
leans on a skill the roles swap: the best skill match is an image like many others
(moderate R_c|s) and the concept neighbour, whose question asks for another skill,
falls deep in the skill ranking (large R_s|c). So the dominant space is the one that
pushes the other space's best match down: Δ > 0 says concept, Δ < 0 says skill.

Calibration: the two spaces are not alike (dimension, tie structure, cluster sizes),
so Δ has an offset even for a benchmark that looks like the pool. ``decide`` takes
Δ of a *reference* set, pool samples used as queries with themselves left out of
their lists, and predicts from the margin ``Δ_bench - Δ_ref``: concept if > 0, else
skill. Its confidence is the share of bootstrap resamples (benchmark samples and
reference samples resampled independently, seeded) whose margin has the prediction's
sign: 0.5 is a coin flip, 1.0 means every resample agrees.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.ranked_lists import TIE_TOL, ranks_of, top_group

Space = str  # "concept" | "skill"


@dataclass(frozen=True)
class CrossRanks:
    """Per-sample cross-ranks of one set of queries.

    Ranks are floats because a tied top group contributes the geometric mean of its
    members' ranks (module docstring); ``ties_*`` keep how many rows that mean is over,
    so a rank averaged over dozens of interchangeable rows can be told from one row's.

    r_cs: float64 (q,), R_c|s (>= 1; depth_c + 1 where no skill neighbour exists).
    r_sc: float64 (q,), R_s|c.
    censored_cs / censored_sc: bool (q,), a member of the top group is not in the
        other list: the rank is a lower bound.
    depth_c / depth_s: int64 (q,), real entries of each sample's list.
    ties_s: int64 (q,), members of the skill list's top group (what R_c|s averages).
    ties_c: int64 (q,), members of the concept list's top group (what R_s|c averages).
    """

    r_cs: np.ndarray
    r_sc: np.ndarray
    censored_cs: np.ndarray
    censored_sc: np.ndarray
    depth_c: np.ndarray
    depth_s: np.ndarray
    ties_c: np.ndarray
    ties_s: np.ndarray

    def __len__(self) -> int:
        return len(self.r_cs)

    def aggregate(self) -> dict:
        """Medians of log-ranks, Δ, censored shares, median ranks, tie-group sizes
        (JSON-ready)."""
        return aggregate(self.r_cs, self.r_sc, self.censored_cs, self.censored_sc,
                         self.ties_c, self.ties_s)  # fmt: skip


def _group_rank(top_ids, top_scores, ids, scores, tol):
    """R of each query's top group of ``top_ids`` within ``ids``: float64 rank,
    bool censored, int64 depth, int64 members, all (q,)."""
    top_ids = np.asarray(top_ids)
    q = len(top_ids)
    member = top_group(top_ids, top_scores, tol)
    row, col = np.nonzero(member)
    rank, cens, depth = ranks_of(row, top_ids[row, col], ids, scores, tol)
    ties = np.bincount(row, minlength=q).astype(np.int64)
    out = depth + 1.0  # no top group (an empty list): censored just past the other list
    censored = ties == 0
    if len(row):
        # Summed in (query, rank) order, so the float result cannot depend on the order
        # the index listed the tied rows in.
        order = np.lexsort((rank, row))
        row, rank, cens = row[order], rank[order], cens[order]
        mean_log = np.bincount(row, weights=np.log(rank), minlength=q) / np.maximum(ties, 1)
        first = np.flatnonzero(np.r_[True, row[1:] != row[:-1]])
        last = np.r_[first[1:], len(row)] - 1
        has = row[first]
        # One rank shared by every member (no ties, most often) is that rank exactly,
        # not exp(log(r)) a bit off it.
        same = rank[first] == rank[last]
        out[has] = np.where(same, rank[first], np.exp(mean_log[has]))
        censored |= np.bincount(row, weights=cens, minlength=q) > 0
    return out, censored, depth, ties


def cross_ranks(
    concept_ids: np.ndarray,
    concept_scores: np.ndarray,
    skill_ids: np.ndarray,
    skill_scores: np.ndarray,
    tol: float = TIE_TOL,
) -> CrossRanks:
    """R_c|s and R_s|c of every query from its two neighbour lists (tie-aware: module
    docstring), independent of the order the index listed tied rows in.

    Args:
        concept_ids, concept_scores: int64 / float32 (q, k_c), the concept-space lists,
            best first (``RetrievalService.search`` output).
        skill_ids, skill_scores: int64 / float32 (q, k_s), the skill-space lists (pool
            rows, the coordinate both spaces share). String ids (object, None for a
            missing result) work too.
        tol: scores within ``tol`` count as tied (top group and ranks alike).
    Raises:
        ValueError: the two spaces answer a different number of queries.
    """
    if len(concept_ids) != len(skill_ids):
        raise ValueError(f"{len(concept_ids)} concept rows but {len(skill_ids)} skill rows")
    r_cs, cens_cs, depth_c, ties_s = _group_rank(skill_ids, skill_scores, concept_ids,
                                                 concept_scores, tol)  # fmt: skip
    r_sc, cens_sc, depth_s, ties_c = _group_rank(concept_ids, concept_scores, skill_ids,
                                                 skill_scores, tol)  # fmt: skip
    return CrossRanks(r_cs, r_sc, cens_cs, cens_sc, depth_c, depth_s, ties_c, ties_s)


def drop_self(
    ids: np.ndarray, scores: np.ndarray, own: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Lists of pool samples used as queries, with each query's own id removed.

    Args:
        ids, scores: int64 / float32 (q, k + 1), searched with one extra neighbour.
        own: int64 (q,), each query's pool row.
        k: the width to return.
    Returns:
        ``(ids (q, k) int64, scores (q, k) float32)``: the list without ``own[i]`` (or
        its first k entries where the query's row was not found).
    """
    ids = np.asarray(ids)
    keep = ids != np.asarray(own, dtype=ids.dtype)[:, None]
    # Stable: the first k kept entries of each row, in order.
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(ids, order, 1), np.take_along_axis(scores, order, 1)


def aggregate(
    r_cs: np.ndarray,
    r_sc: np.ndarray,
    censored_cs: np.ndarray | None = None,
    censored_sc: np.ndarray | None = None,
    ties_c: np.ndarray | None = None,
    ties_s: np.ndarray | None = None,
) -> dict:
    """``m_cs``, ``m_sc`` (medians of natural log-ranks), ``delta`` = m_cs - m_sc, the
    median ranks, the censored shares and the top groups' sizes (median and mean of
    ``ties_c`` / ``ties_s``: how much of each rank is an average over tied rows), for
    (q,) rank arrays (int or float, >= 1, q >= 1)."""
    if len(r_cs) == 0:
        raise ValueError("no ranks to aggregate")
    m_cs = float(np.median(np.log(r_cs)))
    m_sc = float(np.median(np.log(r_sc)))
    out = {
        "samples": int(len(r_cs)),
        "median_log_r_cs": m_cs,
        "median_log_r_sc": m_sc,
        "delta": m_cs - m_sc,
        "median_r_cs": float(np.median(r_cs)),
        "median_r_sc": float(np.median(r_sc)),
    }
    if censored_cs is not None:
        out["censored_cs"] = float(np.mean(censored_cs))
    if censored_sc is not None:
        out["censored_sc"] = float(np.mean(censored_sc))
    for name, ties in (("ties_c", ties_c), ("ties_s", ties_s)):
        if ties is not None:
            out[f"median_{name}"] = float(np.median(ties))
            out[f"mean_{name}"] = float(np.mean(ties))
    return out


def _delta(log_cs: np.ndarray, log_sc: np.ndarray) -> np.ndarray:
    """Δ per row of (b, n) log-rank resamples: float64 (b,)."""
    return np.median(log_cs, axis=1) - np.median(log_sc, axis=1)


# Bootstrap resamples drawn at once: (64, n) indices and two (64, n) float64 copies, not
# (n_boot, n) (10k samples x 1000 resamples would be 240 MB at once). Even, so every
# draw but the last consumes whole 64-bit words and the stream equals one (n_boot, n) draw.
BOOT_CHUNK = 64


def _boot_deltas(rng, log_cs: np.ndarray, log_sc: np.ndarray, n_boot: int) -> np.ndarray:
    """Δ of ``n_boot`` resamples (with replacement) of the n samples: float64 (n_boot,)."""
    out = np.empty(n_boot)
    for start in range(0, n_boot, BOOT_CHUNK):
        stop = min(n_boot, start + BOOT_CHUNK)
        pick = rng.integers(0, len(log_cs), size=(stop - start, len(log_cs)))
        out[start:stop] = _delta(log_cs[pick], log_sc[pick])
    return out


@dataclass(frozen=True)
class Decision:
    """The predicted dominant space of a benchmark and how sure the data are of it."""

    prediction: Space  # "concept" or "skill"
    confidence: float  # share of bootstrap resamples agreeing, in [0, 1]
    margin: float  # Δ_bench - Δ_ref
    delta: float  # Δ of the benchmark
    delta_ref: float  # Δ of the reference (0.0 without one)
    z: float  # margin / bootstrap standard deviation (inf when it is 0)

    def as_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and not np.isfinite(v) else v)
                for k, v in self.__dict__.items()}  # fmt: skip


def decide(
    bench: CrossRanks,
    reference: CrossRanks | None = None,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    threshold: float = 0.0,
) -> Decision:
    """Predict the dominant space from the margin Δ_bench - Δ_ref (module docstring).

    Args:
        bench: cross-ranks of the benchmark's samples (at least one).
        reference: cross-ranks of pool samples as queries (self excluded); None takes
            Δ_ref = 0 (no calibration).
        n_boot: bootstrap resamples for the confidence (0: confidence 1.0 or 0.5 at a tie).
        seed: the bootstrap's seed.
        threshold: the margin above which the prediction is concept: 0 uncalibrated; a
            value fitted on calibration worlds whose leaning is known moves the line
            where the two spaces' offset is not what the reference alone says
            (``fit_threshold``).
    Returns:
        ``Decision``: "concept" when the margin is > threshold, "skill" when it is below;
        a margin exactly at it is called "skill" with confidence 0.5 at most.
    """
    log_cs, log_sc = np.log(bench.r_cs), np.log(bench.r_sc)
    delta = float(_delta(log_cs[None], log_sc[None])[0])
    delta_ref = 0.0
    if reference is not None and len(reference):
        ref_cs, ref_sc = np.log(reference.r_cs), np.log(reference.r_sc)
        delta_ref = float(_delta(ref_cs[None], ref_sc[None])[0])
    margin = delta - delta_ref
    prediction = "concept" if margin > threshold else "skill"
    if n_boot <= 0:
        at_line = margin == threshold
        return Decision(prediction, 0.5 if at_line else 1.0, margin, delta, delta_ref, np.inf)
    rng = np.random.default_rng(seed)
    boot = _boot_deltas(rng, log_cs, log_sc, n_boot)
    if reference is not None and len(reference):
        boot = boot - _boot_deltas(rng, ref_cs, ref_sc, n_boot)
    agree = boot > threshold if prediction == "concept" else boot < threshold
    confidence = float(np.mean(agree))
    if margin == threshold:
        confidence = min(confidence, 0.5)
    spread = float(np.std(boot))
    z = abs(margin - threshold) / spread if spread > 0 else np.inf
    return Decision(prediction, confidence, margin, delta, delta_ref, float(z))


def sample_spaces(ranks: CrossRanks, delta_ref: float, fallback: Space) -> np.ndarray:
    """Each benchmark sample's own leaning: bool (q,), True for concept.

    The per-sample form of ``decide``'s margin: log R_c|s(i) - log R_s|c(i) - Δ_ref,
    concept where > 0, skill where < 0, and the benchmark's ``fallback`` prediction
    where it is exactly 0 (both ranks censored at equal depths, say: the sample says
    nothing). Why per sample: a benchmark's median can hide a minority of samples that
    lean the other way; they are served by the space they lean on.
    """
    margin = np.log(ranks.r_cs) - np.log(ranks.r_sc) - delta_ref
    return np.where(margin == 0, fallback == "concept", margin > 0)


def fit_threshold(margins: np.ndarray, concept_better: np.ndarray) -> tuple[float, int]:
    """The ``decide`` threshold that calls the most calibration benchmarks right.

    margins: float (m,), each calibration benchmark's Δ_bench - Δ_ref; concept_better:
    bool (m,), whether its concept-targeted selection trained better (ties left out by
    the caller). Candidates are 0 and the midpoints between consecutive sorted margins
    (and one beyond each end); among those with the most right, the one nearest 0 (the
    uncalibrated rule) wins, so a calibration that cannot improve on it changes nothing.
    Returns ``(threshold, right)``.
    """
    margins = np.asarray(margins, np.float64)
    concept_better = np.asarray(concept_better, bool)
    if margins.shape != concept_better.shape or margins.ndim != 1:
        raise ValueError(f"margins {margins.shape} and labels {concept_better.shape} differ")
    ends = np.sort(margins)
    candidates = np.unique(np.r_[0.0, (ends[1:] + ends[:-1]) / 2, ends[:1] - 1, ends[-1:] + 1])
    right = ((margins[None] > candidates[:, None]) == concept_better[None]).sum(axis=1)
    best = np.flatnonzero(right == right.max())
    pick = best[np.argmin(np.abs(candidates[best]))]
    return float(candidates[pick]), int(right[pick])
