"""Cross-rank analysis: is a benchmark dominated by its concepts or by its skills?

"Concepts or Skills?" (seeds/000) retrieves each benchmark sample's pool neighbours in
two spaces, concept (CLIP image) and skill (an LLM's skill description, embedded), and
predicts from how the two neighbour lists rank each other which space the benchmark
leans on. The paper's exact formula is not public; this module defines one, precisely.

Per benchmark sample i, with its concept list C_i and skill list S_i (pool rows, best
first, each ``depth`` long, scores float32):

    R_c|s(i) = the competition rank of S_i[0] (the top-1 skill neighbour) within C_i:
               1 + #{x in C_i : score_c(x) > score_c(S_i[0]) + tol}
    R_s|c(i) = symmetrically, the rank of C_i[0] within S_i.

A rank counts only strictly better items, so a tie group shares its best rank (skill
descriptions repeat word for word, and equal texts have equal vectors). An item absent
from the other list ranks deeper than the list: it is *censored* at ``depth_i + 1``
(``depth_i`` = the list's real entries), and flagged. Both ranks are >= 1.

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

TIE_TOL = 1e-6
Space = str  # "concept" | "skill"


@dataclass(frozen=True)
class CrossRanks:
    """Per-sample cross-ranks of one set of queries.

    r_cs: int64 (q,), R_c|s (>= 1; depth_c + 1 where censored).
    r_sc: int64 (q,), R_s|c.
    censored_cs / censored_sc: bool (q,), the rank is a lower bound (not in the list).
    depth_c / depth_s: int64 (q,), real entries of each sample's list.
    """

    r_cs: np.ndarray
    r_sc: np.ndarray
    censored_cs: np.ndarray
    censored_sc: np.ndarray
    depth_c: np.ndarray
    depth_s: np.ndarray

    def __len__(self) -> int:
        return len(self.r_cs)

    def aggregate(self) -> dict:
        """Medians of log-ranks, Δ, censored shares and median ranks (JSON-ready)."""
        return aggregate(self.r_cs, self.r_sc, self.censored_cs, self.censored_sc)


def absent(ids: np.ndarray) -> np.ndarray:
    """bool, ``ids``' shape: no result here (row -1, or None in string ids)."""
    ids = np.asarray(ids)
    return np.equal(ids, None) if ids.dtype == object else ids < 0


def _valid(ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """bool (q, k): entries that hold a result (a row, a finite score)."""
    return ~absent(ids) & np.isfinite(scores)


def rank_within(
    target: np.ndarray, ids: np.ndarray, scores: np.ndarray, tol: float = TIE_TOL
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The competition rank of ``target[i]`` within the ranked list ``ids[i]``.

    Args:
        target: int64 (q,), one pool row per query (-1: nothing to rank); or string ids
            (object, None) with ``ids`` of strings.
        ids: int64 (q, k), each row best first; -1 marks a missing result (tail).
        scores: float32 (q, k), matching scores (-inf for missing results).
        tol: scores within ``tol`` of the target's count as tied with it.
    Returns:
        ``(rank int64 (q,), censored bool (q,), depth int64 (q,))``: rank = 1 + the
        entries scoring more than the target's score + tol; where the target is not in
        the list (or is None) rank = depth + 1 and censored is True.
    """
    ids, target = np.asarray(ids), np.asarray(target)
    scores = np.asarray(scores, dtype=np.float64)
    valid = _valid(ids, scores)
    depth = valid.sum(axis=1).astype(np.int64)
    hit = (ids == target[:, None]) & valid
    found = hit.any(axis=1) & ~absent(target)
    pos = hit.argmax(axis=1)
    own = scores[np.arange(len(ids)), pos]
    better = ((scores > own[:, None] + tol) & valid).sum(axis=1)
    rank = np.where(found, 1 + better, depth + 1).astype(np.int64)
    return rank, ~found, depth


def cross_ranks(
    concept_ids: np.ndarray,
    concept_scores: np.ndarray,
    skill_ids: np.ndarray,
    skill_scores: np.ndarray,
    tol: float = TIE_TOL,
) -> CrossRanks:
    """R_c|s and R_s|c of every query from its two neighbour lists.

    Args:
        concept_ids, concept_scores: int64 / float32 (q, k_c), the concept-space lists,
            best first (``RetrievalService.search`` output).
        skill_ids, skill_scores: int64 / float32 (q, k_s), the skill-space lists (pool
            rows, the coordinate both spaces share).
    Raises:
        ValueError: the two spaces answer a different number of queries.
    """
    if len(concept_ids) != len(skill_ids):
        raise ValueError(f"{len(concept_ids)} concept rows but {len(skill_ids)} skill rows")
    skill_ids, concept_ids = np.asarray(skill_ids), np.asarray(concept_ids)
    top_s = skill_ids[:, 0] if len(skill_ids) else np.zeros(0, skill_ids.dtype)
    top_c = concept_ids[:, 0] if len(concept_ids) else top_s
    r_cs, cens_cs, depth_c = rank_within(top_s, concept_ids, concept_scores, tol)
    r_sc, cens_sc, depth_s = rank_within(top_c, skill_ids, skill_scores, tol)
    return CrossRanks(r_cs, r_sc, cens_cs, cens_sc, depth_c, depth_s)


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
) -> dict:
    """``m_cs``, ``m_sc`` (medians of natural log-ranks), ``delta`` = m_cs - m_sc, the
    median ranks, and the censored shares, for int (q,) rank arrays (q >= 1)."""
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
) -> Decision:
    """Predict the dominant space from the margin Δ_bench - Δ_ref (module docstring).

    Args:
        bench: cross-ranks of the benchmark's samples (at least one).
        reference: cross-ranks of pool samples as queries (self excluded); None takes
            Δ_ref = 0 (no calibration).
        n_boot: bootstrap resamples for the confidence (0: confidence 1.0 or 0.5 at a tie).
        seed: the bootstrap's seed.
    Returns:
        ``Decision``: "concept" when the margin is > 0, "skill" when it is < 0; a margin of
        exactly 0 is called "skill" with confidence 0.5 at most.
    """
    log_cs, log_sc = np.log(bench.r_cs), np.log(bench.r_sc)
    delta = float(_delta(log_cs[None], log_sc[None])[0])
    delta_ref = 0.0
    if reference is not None and len(reference):
        ref_cs, ref_sc = np.log(reference.r_cs), np.log(reference.r_sc)
        delta_ref = float(_delta(ref_cs[None], ref_sc[None])[0])
    margin = delta - delta_ref
    prediction = "concept" if margin > 0 else "skill"
    if n_boot <= 0:
        return Decision(prediction, 0.5 if margin == 0 else 1.0, margin, delta, delta_ref, np.inf)
    rng = np.random.default_rng(seed)
    boot = _boot_deltas(rng, log_cs, log_sc, n_boot)
    if reference is not None and len(reference):
        boot = boot - _boot_deltas(rng, ref_cs, ref_sc, n_boot)
    agree = boot > 0 if prediction == "concept" else boot < 0
    confidence = float(np.mean(agree))
    if margin == 0:
        confidence = min(confidence, 0.5)
    spread = float(np.std(boot))
    z = abs(margin) / spread if spread > 0 else np.inf
    return Decision(prediction, confidence, margin, delta, delta_ref, float(z))
