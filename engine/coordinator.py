"""The PROGRESS coordinator's state: rounds, scores, the ledger, and its checkpoint.

Plain Python and numpy, so that it is tested without Ray; ``actors.coordinator`` owns
one of these, persists it after every round and exports its counters.

Rounds are numbered from 0 (the warm-up). After training on round t the trainer
scores the round's probe rows (``eval_positions(t)``: fixed per-cluster probe sets,
``engine.probes``) and reports one value per row; round t + 1 is drawn from Δk between
those values and the same rows' values ``gap`` rounds earlier. Before the warm-up
trains, the trainer reports the base model's values as round -1 ("baseline"), so the
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

from engine.probes import (
    NOT_PROBED,
    cluster_means,
    cluster_progress,
    grow_probes,
    probe_positions,
    standardise,
)
from engine.progress import Ledger, PoolClusters, ledger_plan, select_round
from engine.selection_rule import ProgressSettings
from engine.within import candidate_positions, diversity_layout, pick_in_band

BASELINE = -1  # the scores of the model before any training (reported for "round -1")


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
    candidates: int = 0  # rows offered to the trainer's uncertainty (within: uncertainty)

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
        self.probe_round = np.full(clusters.n, NOT_PROBED, np.int32)  # engine.probes
        self.probes_built = NOT_PROBED  # the last round whose probe set is grown
        # round -> float64 (m,), the values of probe_positions(round), NaN = not scored;
        # only the rounds a Δk still needs are kept (and checkpointed)
        self.row_values: dict[int, np.ndarray] = {}
        self.scores: dict[int, np.ndarray] = {}  # round -> float64 (K,) mean, NaN = none
        self.evaluated: dict[int, np.ndarray] = {}  # round -> int64 (K,) rows behind a score
        self.records: list[RoundRecord] = []
        self.training: dict[int, dict] = {}  # round -> the trainer's figures for it
        # within 'uncertainty': positions int64 (n,) by (cluster, prototype rank)
        self.layout: np.ndarray | None = None

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

    def report(self, round_index: int, values: np.ndarray, training: dict | None = None) -> None:
        """The values float (m,) of ``eval_positions(round_index)``'s rows, in its order
        (NaN = not scored), after training on ``round_index`` (``BASELINE`` before any
        training); ``training`` the trainer's figures of the round (JSON values)."""
        if not BASELINE <= round_index < max(self.rounds, 1):
            raise ValueError(
                f"scores for round {round_index}, but rounds 0..{self.rounds - 1} were handed out"
            )
        if max(round_index, 0) > self.probes_built:  # the baseline scores round 0's rows
            raise ValueError(
                f"scores for round {round_index} before its probe rows were handed out: "
                "ask eval_positions first"
            )
        positions = probe_positions(self.probe_round, round_index)
        values = np.asarray(values, np.float64)
        if values.shape != positions.shape:
            raise ValueError(
                f"{values.size} values for round {round_index}'s {positions.size} probe rows"
            )
        self.row_values[round_index] = values
        labels = self.clusters.labels[positions]
        self.scores[round_index], self.evaluated[round_index] = cluster_means(
            labels, values, self.clusters.k
        )
        if training is not None:
            self.training[round_index] = dict(training)
        oldest = round_index - self.settings.rule.gap  # what the next Δk compares with
        for r in [r for r in self.row_values if r < oldest]:
            del self.row_values[r]

    def delta(self, round_index: int) -> np.ndarray:
        """Δk float64 (K,) on the probe rows scored both after ``round_index`` and ``gap``
        rounds earlier (the baseline counts as round -1); all NaN when either is missing."""
        now, then = round_index, round_index - self.settings.rule.gap
        if now not in self.row_values or then not in self.row_values:
            return np.full(self.clusters.k, np.nan)
        pos_now = probe_positions(self.probe_round, now)
        pos_then = probe_positions(self.probe_round, then)
        # a probe set only grows: the earlier set is a subset of the later
        at = np.searchsorted(pos_now, pos_then)
        v_now, v_then = self.row_values[now][at], self.row_values[then]
        both = np.isfinite(v_now) & np.isfinite(v_then)
        rule = self.settings.rule
        delta, _ = cluster_progress(
            self.clusters.labels[pos_then[both]],
            v_now[both],
            v_then[both],
            self.clusters.k,
            rule.metric,
            rule.prior,
        )
        return delta

    def set_diversity(self, rank: np.ndarray) -> None:
        """Each row's place int (n,) in its cluster's prototype order (``engine.within``),
        which rule ``within: uncertainty`` offers candidates by; not checkpointed (the
        run keeps it as its own artifact)."""
        self.layout = diversity_layout(self.clusters, rank)

    def candidates(self, round_index: int) -> np.ndarray:
        """The rows the trainer scores before round ``round_index`` is drawn (rule
        ``within: uncertainty``): per cluster the next prototypes not selected yet, as
        many as ``candidates`` x its quota; int64 positions in (cluster, prototype)
        order. Empty for a round drawn already, a finished run, or rule 'uniform'."""
        drawn = 0 <= round_index < self.rounds
        if self.settings.rule.within == "uniform" or drawn or not self._new_round(round_index):
            return np.empty(0, np.int64)
        return self._candidates(self._plan(round_index))

    def next_round(self, round_index: int, uncertainty: np.ndarray | None = None) -> np.ndarray:
        """The rows of round ``round_index``: drawn now if new, else the rows drawn before
        (round 0: the warm-up's); int64 positions, ascending. Empty, and no round is
        recorded, once the budget is spent. Rule ``within: uncertainty`` needs
        ``uncertainty`` float (m,) of ``candidates(round_index)``'s rows, in its order."""
        if 0 <= round_index < self.rounds:
            return self.ledger.rows_of_round(round_index)
        if not self._new_round(round_index):
            return np.empty(0, np.int64)  # nothing left: no round, no record
        s = self.settings
        delta = self.delta(round_index - 1)
        offered = []

        def in_band(plan, selected):
            rows = self._candidates(plan)
            if rows.size == 0:  # no cluster progressed: the whole round explores
                return rows
            if uncertainty is None or len(uncertainty) != rows.size:
                got = "none" if uncertainty is None else len(uncertainty)
                raise ValueError(
                    f"round {round_index} draws by uncertainty: it needs one value per row "
                    f"of candidates({round_index}) ({rows.size}), got {got}"
                )
            offered.append(rows.size)
            labels = self.clusters.labels[rows]
            return rows[pick_in_band(labels, uncertainty, plan.quota, s.rule.band)]

        rng = np.random.default_rng([s.seed, round_index])
        positions, plan = select_round(
            self.ledger,
            self.clusters,
            self._scaled(delta),
            s.round_size,
            s.rule.temperature,
            s.rule.explore,
            rng,
            round_index,
            choose=None if s.rule.within == "uniform" else in_band,
        )
        self._record(round_index, "progress", positions, delta, plan.probabilities, plan.explore)
        self.records[-1].candidates = sum(offered)
        return self.ledger.rows_of_round(round_index)

    def _new_round(self, round_index: int) -> bool:
        """Whether ``round_index`` is the next round to draw (False: the budget is spent);
        raises for any round but the next."""
        if not self.rounds:
            raise ValueError("the warm-up (round 0) must be recorded before selection rounds")
        if round_index != self.rounds:
            raise ValueError(f"round {round_index} asked, but the next round is {self.rounds}")
        if round_index - 1 not in self.scores:
            # Δk would be NaN and the round drawn uniformly without a word
            raise ValueError(
                f"round {round_index} asked before round {round_index - 1}'s scores were "
                "reported: the trainer reports a round before asking for the next"
            )
        return not self.finished

    def _scaled(self, delta: np.ndarray) -> np.ndarray:
        return standardise(delta) if self.settings.rule.scale == "std" else delta

    def _plan(self, round_index: int):
        """The round's quotas, as ``next_round`` plans them before its draw."""
        s = self.settings
        return ledger_plan(self.ledger, self.clusters, self._scaled(self.delta(round_index - 1)),
                           s.round_size, s.rule.temperature, s.rule.explore)  # fmt: skip

    def _candidates(self, plan) -> np.ndarray:
        if self.layout is None:
            raise ValueError(
                "rule within 'uncertainty' needs the clusters' prototype order: set_diversity first"
            )
        return candidate_positions(self.clusters, self.layout, self.ledger.selected,
                                   plan.quota, self.settings.rule.candidates)  # fmt: skip

    def eval_positions(self, round_index: int) -> np.ndarray:
        """The probe rows to score after training on ``round_index`` (``BASELINE``: the
        warm-up's, as round 0's): the fixed per-cluster probe sets, topped up now with
        rows of earlier rounds if this round's are not grown yet; int64, ascending."""
        round_index = max(round_index, 0)
        if round_index > self.probes_built:
            if round_index >= self.rounds:
                raise ValueError(
                    f"probe rows after round {round_index} asked, but rounds "
                    f"0..{self.rounds - 1} were handed out"
                )
            rng = np.random.default_rng([self.settings.seed, round_index, 1])
            cap = self.settings.rule.eval_per_cluster
            grow_probes(
                self.probe_round, self.clusters, self.ledger.round_of, round_index, cap, rng
            )
            self.probes_built = round_index
        return probe_positions(self.probe_round, round_index)

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
        values = sorted(self.row_values)
        header["probes_built"] = self.probes_built
        header["value_rounds"] = values
        arrays = {
            **self.ledger.state(),
            "probe_round": self.probe_round,
            "row_values": (
                np.concatenate([self.row_values[r] for r in values]) if values else np.zeros(0)
            ),
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
        if "probe_round" in arrays:
            state.probe_round = arrays["probe_round"].astype(np.int32)
            state.probes_built = int(header["probes_built"])
            flat, at = arrays["row_values"], 0
            for r in header["value_rounds"]:
                m = probe_positions(state.probe_round, r).size
                state.row_values[r], at = flat[at : at + m], at + m
        state.records = [RoundRecord(**r) for r in header["records"]]
        state.training = {int(r): m for r, m in header.get("training", {}).items()}
        return state

    def training_rounds(self) -> list[dict]:
        """The trainer's figures of every reported round, in round order."""
        return [self.training[r] for r in sorted(self.training)]

    def rounds_jsonl(self) -> str:
        return "".join(json.dumps(r.to_json(), sort_keys=True) + "\n" for r in self.records)
