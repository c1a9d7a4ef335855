"""The PROGRESS coordinator's state: rounds, scores, the ledger, and its checkpoint.

Plain Python and numpy, so that it is tested without Ray; ``actors.coordinator`` owns
one of these, persists it after every round and exports its counters.

Rounds are numbered from 0 (the warm-up). After training on round t the trainer
reports per-cluster scores ``scores[t]``; round t + 1 is drawn from Δk between
``scores[t]`` and ``scores[t - gap]`` (``engine.progress``). Before the warm-up trains,
the trainer reports the base model's scores as ``scores[-1]`` ("baseline"), so the
first selection round already has a Δk.

Every call is idempotent by round number: asking again for round t returns the rows
already chosen for it, and reporting scores again for round t replaces them, so a
call retried after a crash (of the caller or of the coordinator) neither spends the
budget twice nor shifts the history. The draw of round t uses its own seeded
generator (seed, t), so a coordinator restored from the checkpoint of round t - 1
draws exactly the rows it drew before it died.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from engine.progress import Ledger, Metric, PoolClusters, relative_progress, select_round

BASELINE = -1  # the scores of the model before any training (reported for "round -1")


class SelectionRule(BaseModel):
    """How a PROGRESS round picks clusters from the score history (PROGRESS, Alg. 1)."""

    model_config = ConfigDict(extra="forbid")

    metric: Metric = Field(
        "accuracy", description="Cluster score: greedy-answer accuracy, or mean per-token loss."
    )
    temperature: float = Field(1.0, gt=0, description="τ of softmax(Δk / τ) (paper 1.0).")
    explore: float = Field(
        0.1, ge=0, le=1, description="δ: share of a round drawn uniformly from the other clusters."
    )
    gap: int = Field(1, ge=1, description="γ: Δk compares scores this many rounds apart.")
    eval_per_cluster: int = Field(
        100, ge=1, description="Selected rows scored per cluster each round: min(n_k, this)."
    )


class ProgressSettings(BaseModel):
    """What the coordinator needs: the resolved sizes, the seed, and the run's selection
    rule (the very sub-model of ``vlselect progress``'s config the trainer also receives)."""

    model_config = ConfigDict(extra="forbid")

    budget: int = Field(ge=1, description="Rows whose answers may be revealed, warm-up included.")
    round_size: int = Field(ge=1, description="Rows picked per selection round.")
    seed: int = Field(0, ge=0, description="Seed of every draw (round t uses (seed, t)).")
    rule: SelectionRule = Field(default_factory=SelectionRule, description="How rounds pick.")


@dataclass
class RoundRecord:
    """One line of ``rounds.jsonl``."""

    round: int
    kind: str  # "warmup" or "progress"
    picks: int
    picks_per_cluster: dict[str, int]
    spent: int
    budget: int
    delta: dict[str, float]
    probabilities: dict[str, float]
    explore: int

    def to_json(self) -> dict:
        return self.__dict__.copy()


def _sparse(values: np.ndarray, keep: np.ndarray, digits: int | None = 6) -> dict[str, float]:
    """{cluster: value} where ``keep``; ints when ``digits`` is None."""
    clusters = np.flatnonzero(keep)
    kept = values[clusters] if digits is None else np.round(values[clusters], digits)
    return dict(zip(clusters.astype(str).tolist(), kept.tolist(), strict=True))


class CoordinatorState:
    """Budget ledger, per-cluster score history and round records of one PROGRESS run.

    clusters: the pool's labels (position i = the i-th pool row of the run).
    """

    def __init__(self, settings: ProgressSettings, clusters: PoolClusters):
        if settings.budget > clusters.n:
            raise ValueError(f"budget {settings.budget} exceeds the pool of {clusters.n} rows")
        self.settings = settings
        self.clusters = clusters
        self.ledger = Ledger(clusters.n, settings.budget)
        self.scores: dict[int, np.ndarray] = {}  # round -> float64 (K,), NaN = not scored
        self.evaluated: dict[int, np.ndarray] = {}  # round -> int64 (K,) rows behind a score
        self.records: list[RoundRecord] = []
        self.training: dict[int, dict] = {}  # round -> the trainer's figures for it

    # -- rounds ------------------------------------------------------------------------

    @property
    def rounds(self) -> int:
        """Rounds handed out so far (the warm-up included)."""
        return len(self.records)

    @property
    def finished(self) -> bool:
        return self.ledger.left == 0 or self.ledger.spent == self.clusters.n

    def warmup(self, positions: np.ndarray) -> np.ndarray:
        """Record round 0, chosen by the warm-up selector; int64 positions, ascending."""
        if self.rounds:
            return self.ledger.rows_of_round(0)
        positions = np.asarray(positions, np.int64)
        self.ledger.take(positions, 0)
        self._record(0, "warmup", positions, np.full(self.clusters.k, np.nan), None, 0)
        return self.ledger.rows_of_round(0)

    def report(
        self,
        round_index: int,
        scores: np.ndarray,
        evaluated: np.ndarray,
        training: dict | None = None,
    ) -> None:
        """Scores float (K,) (NaN = not scored) after training on ``round_index`` rows
        (``BASELINE`` before any training); ``evaluated`` int (K,) rows behind each;
        ``training`` the trainer's figures of the round (JSON values), kept with it."""
        if not BASELINE <= round_index < max(self.rounds, 1):
            raise ValueError(
                f"scores for round {round_index}, but rounds 0..{self.rounds - 1} were handed out"
            )
        scores = np.asarray(scores, np.float64)
        if scores.shape != (self.clusters.k,):
            raise ValueError(f"scores of shape {scores.shape}, expected ({self.clusters.k},)")
        self.scores[round_index] = scores
        self.evaluated[round_index] = np.asarray(evaluated, np.int64)
        if training is not None:
            self.training[round_index] = dict(training)

    def delta(self, round_index: int) -> np.ndarray:
        """Δk float64 (K,) from the scores after ``round_index`` and ``gap`` rounds earlier
        (the baseline counts as round -1); all NaN when either is missing."""
        now, then = round_index, round_index - self.settings.rule.gap
        if now not in self.scores or then not in self.scores:
            return np.full(self.clusters.k, np.nan)
        return relative_progress(
            self.scores[now], self.scores[then], self.evaluated[now], self.settings.rule.metric
        )

    def next_round(self, round_index: int) -> np.ndarray:
        """The rows of round ``round_index``: drawn now if new, else the rows drawn before
        (round 0: the warm-up's); int64 positions, ascending. Empty, and no round is
        recorded, once the budget is spent."""
        if not self.rounds:
            raise ValueError("the warm-up (round 0) must be recorded before selection rounds")
        if 0 <= round_index < self.rounds:
            return self.ledger.rows_of_round(round_index)
        if round_index != self.rounds:
            raise ValueError(f"round {round_index} asked, but the next round is {self.rounds}")
        if round_index - 1 not in self.scores:
            # Δk would be NaN and the round drawn uniformly without a word
            raise ValueError(
                f"round {round_index} asked before round {round_index - 1}'s scores were "
                "reported: the trainer reports a round before asking for the next"
            )
        if self.finished:
            return np.empty(0, np.int64)  # nothing left: no round, no record
        s = self.settings
        delta = self.delta(round_index - 1)
        rng = np.random.default_rng([s.seed, round_index])
        positions, plan = select_round(
            self.ledger,
            self.clusters,
            delta,
            s.round_size,
            s.rule.temperature,
            s.rule.explore,
            rng,
            round_index,
        )
        self._record(round_index, "progress", positions, delta, plan.probabilities, plan.explore)
        return self.ledger.rows_of_round(round_index)

    def eval_positions(self, round_index: int) -> np.ndarray:
        """Selected rows to score after training on ``round_index``: per cluster, a seeded
        random min(n_k, eval_per_cluster) of its selected rows; int64, ascending."""
        round_of = self.ledger.round_of
        scored = (round_of >= 0) & (round_of <= round_index)
        rng = np.random.default_rng([self.settings.seed, round_index, 1])
        cap = np.full(self.clusters.k, self.settings.rule.eval_per_cluster)
        return self.clusters.sample_where(scored, cap, rng)

    def _record(self, round_index, kind, positions, delta, probabilities, explore) -> None:
        per_cluster = np.bincount(self.clusters.labels[positions], minlength=self.clusters.k)
        self.records.append(
            RoundRecord(
                round=round_index,
                kind=kind,
                picks=int(positions.size),
                picks_per_cluster=_sparse(per_cluster, per_cluster > 0, None),
                spent=self.ledger.spent,
                budget=self.ledger.budget,
                delta=_sparse(delta, np.isfinite(delta)),
                probabilities=(
                    {} if probabilities is None else _sparse(probabilities, probabilities > 0)
                ),
                explore=int(explore),
            )
        )

    # -- checkpoint --------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The whole state as one ``.npz`` (no pickle): arrays plus a JSON header."""
        rounds = sorted(self.scores)
        header = {
            "settings": self.settings.model_dump(),
            "k": self.clusters.k,
            "n": self.clusters.n,
            "score_rounds": rounds,
            "records": [r.to_json() for r in self.records],
            "training": {str(r): m for r, m in sorted(self.training.items())},
        }
        arrays = {
            **self.ledger.state(),
            "scores": np.stack([self.scores[r] for r in rounds]) if rounds else np.zeros((0, 0)),
            "evaluated": (
                np.stack([self.evaluated[r] for r in rounds]) if rounds else np.zeros((0, 0))
            ),
            "header": np.frombuffer(json.dumps(header).encode(), np.uint8),
        }
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, clusters: PoolClusters) -> CoordinatorState:
        """Restore a checkpoint against the run's ``clusters`` (which must be the same)."""
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
        header = json.loads(arrays["header"].tobytes())
        if header["n"] != clusters.n or header["k"] != clusters.k:
            raise ValueError(
                f"checkpoint is of a pool of {header['n']} rows in {header['k']} clusters, "
                f"but the run's clustering has {clusters.n} rows in {clusters.k}"
            )
        state = cls(ProgressSettings(**header["settings"]), clusters)
        state.ledger = Ledger.from_state(arrays)
        for i, r in enumerate(header["score_rounds"]):
            state.scores[r] = arrays["scores"][i]
            state.evaluated[r] = arrays["evaluated"][i]
        state.records = [RoundRecord(**r) for r in header["records"]]
        state.training = {int(r): m for r, m in header.get("training", {}).items()}
        return state

    def training_rounds(self) -> list[dict]:
        """The trainer's figures of every reported round, in round order."""
        return [self.training[r] for r in sorted(self.training)]

    def rounds_jsonl(self) -> str:
        return "".join(json.dumps(r.to_json(), sort_keys=True) + "\n" for r in self.records)
