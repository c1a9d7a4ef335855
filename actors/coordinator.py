"""The PROGRESS coordinator: a named Ray actor that owns the budget and hands out rounds.

It loads the run's clustering once (``<ws>/clusters/<name>/assignments``: the pool
rows that PROGRESS may select, in file order, position i = i-th row) and keeps an
``engine.coordinator.CoordinatorState``. After every change it persists, in this
order and each atomically:

    1. the round's rows with their answers (the reveal: the pool is unlabeled until
       then): ``<run>/rounds/round-NNNN.parquet`` (id, pool_row, cluster and the pool's
       ``answer``), the answers read by pool row from only the row groups that hold them,
       written once; a retried round finds it and checks that it holds the same ids.
       The trainer workers read the rest of their own rows (image, conversation) from
       the pool by ``pool_row``: a round's reveal costs one small column of its row
       groups (at 1M rows and 7,500 picks, the slowest round took 949 ms with its checkpoint;
       every column but the image had taken 2.9 s);
    2. the checkpoint ``<run>/coordinator/state.npz``;
    3. ``<run>/rounds.jsonl`` (rewritten whole from the state, so it never holds a
       round twice).

A coordinator restarted by Ray (``max_restarts``) or started again by a new job
restores from the checkpoint; rounds are drawn from a generator seeded by (seed,
round), so a round lost between steps 1 and 2 is drawn again identically. Its
counters go to Ray's metrics (``vlselect_progress_*``, tagged by run), visible in the
Ray dashboard.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import ray
from ray.util.metrics import Counter, Gauge

from actors.adapter import NAMESPACE, ray_options
from engine.artifacts import Clustering, Pool
from engine.coordinator import BASELINE, CoordinatorState
from engine.progress import PoolClusters
from engine.resources import Resources
from engine.selection_rule import ProgressSettings
from engine.shards import read_global_rows, rows_of_ids
from engine.within import DIVERSITY_FOLDER, DIVERSITY_MARKER
from engine.workspace import Workspace

log = logging.getLogger("vlselect.progress")
STATE_FILE = "coordinator/state.npz"


def round_file(run_dir: str, round_index: int) -> str:
    return f"{run_dir}/rounds/round-{round_index:04d}.parquet"


# What the reveal reads from the pool: the oracle's answer. Picks fall in nearly every row
# group of the pool, so every further column read here is a scan of that column per round.
REVEALED_COLUMNS = ["answer"]
# Pool files read at once by a reveal: decoding releases the GIL, and on an object store
# each read is a round trip worth overlapping.
READ_THREADS = 8


def load_pool_clusters(
    ws: Workspace, assignments: list[str], k: int
) -> tuple[pa.Array, PoolClusters]:
    """The clustered pool: ids string (n,) and their labels, in assignment-file order."""
    table = pads.dataset(assignments, filesystem=ws.fs, format="parquet").to_table(
        columns=["id", "cluster"]
    )
    labels = table.column("cluster").to_numpy()
    return table.column("id").combine_chunks(), PoolClusters.from_labels(labels, k)


class Coordinator:
    """Owns one PROGRESS run's ledger. Use through ``ray.remote(Coordinator)``; every
    method is idempotent by round number, so Ray may retry calls in flight."""

    def __init__(
        self,
        ws: Workspace,
        run_dir: str,
        clustering: dict,
        pool_files: list[str],
        settings: dict,
    ):
        self.ws, self.run_dir, self.pool_files = ws, run_dir, pool_files
        self._footers: dict = {}  # pool file -> its Parquet footer, read once
        self.ids, clusters = load_pool_clusters(ws, clustering["assignments"], clustering["k"])
        try:
            self.pool_sizes, self.pool_rows = rows_of_ids(ws.fs, pool_files, self.ids)
        except ValueError as err:
            raise ValueError(
                f"the clustering holds rows the pool does not: {err}; the pool changed after "
                "clustering: run `vlselect cluster` again"
            ) from None
        wanted = ProgressSettings(**settings)
        path = f"{run_dir}/{STATE_FILE}"
        if ws.fs.get_file_info(path).type.name != "NotFound":
            with ws.fs.open_input_stream(path) as f:
                self.state = CoordinatorState.from_bytes(f.read(), clusters)
            if self.state.settings != wanted:
                raise ValueError(
                    f"{path} was written with settings {self.state.settings.model_dump()}, "
                    f"this run asks {wanted.model_dump()}: use a new run name or --overwrite"
                )
            log.info("coordinator restored at round %d", self.state.rounds)
        else:
            self.state = CoordinatorState(wanted, clusters)
        if wanted.rule.within == "uncertainty":
            self.state.set_diversity(self._diversity_ranks())
        self._init_metrics()

    # -- the trainer's calls -------------------------------------------------------------

    def warmup(self, ids: list[str]) -> dict:
        """Record the warm-up selection (pool ids) as round 0 and reveal it."""
        positions = self._positions(ids)
        picked = self.state.warmup(positions)
        return self._commit(0, picked)

    def report(self, round_index: int, values: list[float], training: dict | None = None) -> dict:
        """One value per row of ``eval_ids(round_index)``, in its order (NaN: not
        scored), after training on ``round_index`` (-1: before any), with the round's
        training figures."""
        self.state.report(round_index, np.asarray(values, np.float64), training)
        self._persist()
        return self.status()

    def candidates(self, round_index: int) -> dict:
        """The rows to score for uncertainty before round ``round_index`` is drawn (rule
        ``within: uncertainty``; none otherwise, or once drawn): their ids and pool rows,
        from which a trainer reads the image and the question, never the answer."""
        positions = self.state.candidates(round_index)
        return {
            "ids": self.ids.take(pa.array(positions)).to_pylist(),
            "pool_rows": self.pool_rows[positions].tolist(),
        }

    def next_round(self, round_index: int, uncertainty: list[float] | None = None) -> dict:
        """Round ``round_index``'s rows, drawn now or before (by ``uncertainty``: one value
        per row of ``candidates(round_index)``, where the rule asks for it); the file that
        holds them, and the seconds the draw (``select_s``) and the reveal and checkpoint
        took."""
        start = time.perf_counter()
        values = None if uncertainty is None else np.asarray(uncertainty, np.float64)
        picked = self.state.next_round(round_index, values)
        select_s = time.perf_counter() - start
        committed = self._commit(round_index, picked)
        return {
            **committed,
            "select_s": select_s,
            "commit_s": time.perf_counter() - start - select_s,
        }

    def eval_ids(self, round_index: int) -> list[str]:
        """Ids of the probe rows to score after training on ``round_index`` (BASELINE:
        the warm-up's); the probe sets grow on the first ask, which is persisted."""
        grown = self.state.probes_built
        positions = self.state.eval_positions(round_index)
        if self.state.probes_built != grown:
            self._persist()
        return self.ids.take(pa.array(positions)).to_pylist()

    def labels_of(self, ids: list[str]) -> list[int]:
        """Cluster of each pool id (selected rows only: asking costs no reveal)."""
        positions = self._positions(ids)
        if not self.state.ledger.selected[positions].all():
            raise ValueError("labels asked for rows that are not selected")
        return self.state.clusters.labels[positions].tolist()

    def status(self) -> dict:
        s = self.state
        return {
            "rounds": s.rounds,
            "spent": s.ledger.spent,
            "budget": s.ledger.budget,
            "left": s.ledger.left,
            "revealed": s.ledger.revealed,
            "finished": s.finished,
            "k": s.clusters.k,
            "pool": s.clusters.n,
            "scored_rounds": sorted(s.scores),
        }

    def rounds_jsonl(self) -> str:
        return self.state.rounds_jsonl()

    def training_rounds(self) -> list[dict]:
        return self.state.training_rounds()

    # -- internals ---------------------------------------------------------------------

    def _diversity_ranks(self) -> np.ndarray:
        """Each pool position's place int64 (n,) in its cluster's prototype order, from
        the run's ``diversity`` folder (``jobs.progress_warmup.write_diversity``)."""
        folder = f"{self.run_dir}/{DIVERSITY_FOLDER}"
        marker = f"{folder}/{DIVERSITY_MARKER}"
        if not self.ws.exists(marker):
            raise ValueError(
                f"rule within 'uncertainty' needs the clusters' prototype orders, but "
                f"{marker} is missing: the job writes them before it starts the coordinator"
            )
        parts = self.ws.read_json(marker)["parts"]
        table = pads.dataset(parts, filesystem=self.ws.fs, format="parquet").to_table()
        rank = np.full(self.state.clusters.n, -1, np.int64)
        rank[self._positions(table.column("id").combine_chunks())] = table.column("rank").to_numpy()
        if (rank < 0).any():
            raise ValueError(
                f"{folder} orders {table.num_rows} rows but the clustering has "
                f"{self.state.clusters.n}: the clustering changed after the run began"
            )
        return rank

    def _positions(self, ids: list[str] | pa.Array) -> np.ndarray:
        ids = ids if isinstance(ids, pa.Array) else pa.array(ids, pa.string())
        found = pc.index_in(ids, value_set=self.ids)
        if found.null_count:
            missing = ids.filter(found.is_null()).to_pylist()
            raise ValueError(
                f"{len(missing)} ids are not in the clustered pool, e.g. {missing[:3]}"
            )
        return found.to_numpy().astype(np.int64)

    def _commit(self, round_index: int, positions: np.ndarray) -> dict:
        if positions.size == 0:  # the budget is spent: no round, no file
            return {"round": round_index, "rows": 0, "path": None, **self.status()}
        path = round_file(self.run_dir, round_index)
        ids = self.ids.take(pa.array(positions))
        if self.ws.fs.get_file_info(path).type.name == "NotFound":
            self._reveal(path, positions, ids)
        else:
            written = pads.dataset(path, filesystem=self.ws.fs).to_table(columns=["id"])
            if set(written.column("id").to_pylist()) != set(ids.to_pylist()):
                raise RuntimeError(
                    f"{path} holds other rows than round {round_index} draws now: the run's "
                    "workspace was changed under it; start a new run"
                )
        # read now, or written before a crash that lost the checkpoint: the answers are out
        self.state.ledger.reveal(positions)
        self._persist()
        return {"round": round_index, "rows": len(ids), "path": path, **self.status()}

    def _reveal(self, path: str, positions: np.ndarray, ids: pa.Array) -> None:
        """Read the selected rows' answers from the pool: the oracle.

        By pool row, from only the row groups that hold them, one column: a round costs
        its rows, not a scan of the pool. The pool's files sit in their commit's attempt
        folder and are never rewritten, and the clustering's ids were matched to their
        rows at start, so the rows read are those ids' rows."""
        rows = self.pool_rows[positions]
        answers = read_global_rows(self.ws.fs, self.pool_files, self.pool_sizes, rows,
                                   REVEALED_COLUMNS, READ_THREADS, self._footers)  # fmt: skip
        table = pa.table(
            {
                "id": ids,
                "pool_row": pa.array(rows, pa.int64()),
                "cluster": pa.array(self.state.clusters.labels[positions], pa.int32()),
                "answer": answers.column("answer"),
            }
        )
        self.ws.write_table(path, table)
        self._reveals.inc(len(ids), tags=self._tags)

    def _persist(self) -> None:
        self.ws.write_bytes(f"{self.run_dir}/{STATE_FILE}", self.state.to_bytes())
        self.ws.write_bytes(f"{self.run_dir}/rounds.jsonl", self.state.rounds_jsonl().encode())
        self._update_metrics()

    def _init_metrics(self) -> None:
        self._tags = {"run": self.run_dir.rsplit("/", 1)[-1]}
        keys = ("run",)
        self._spent = Gauge("vlselect_progress_budget_spent", "Rows revealed", tag_keys=keys)
        self._round = Gauge("vlselect_progress_round", "Rounds handed out", tag_keys=keys)
        self._reveals = Counter(
            "vlselect_progress_reveals", "Answers revealed by this process", tag_keys=keys
        )
        self._update_metrics()

    def _update_metrics(self) -> None:
        self._spent.set(self.state.ledger.spent, tags=self._tags)
        self._round.set(self.state.rounds, tags=self._tags)


def start_coordinator(
    ws: Workspace,
    run_dir: str,
    clustering: Clustering,
    pool: Pool,
    settings: ProgressSettings,
    name: str,
    resources: Resources,
    detached: bool = False,
):
    """The run's named coordinator actor: the live one if it exists, else a new one.

    Ray restarts it when it dies (``resources.max_retries``; -1 = always) and retries
    the calls in flight, which are idempotent. ``detached`` keeps it alive after the
    job's driver exits, so a new driver picks it up by name.
    """
    options = ray_options(resources, actor=True)
    if detached:
        options["lifetime"] = "detached"
    return (
        ray.remote(Coordinator)
        .options(name=name, namespace=NAMESPACE, get_if_exists=True, **options)
        .remote(
            ws,
            run_dir,
            {"assignments": clustering.assignments, "k": clustering.meta.k},
            pool.shards,
            settings.model_dump(),
        )
    )


def get_coordinator(name: str):
    """The live coordinator ``name`` (ValueError when there is none)."""
    return ray.get_actor(name, namespace=NAMESPACE)


__all__ = [
    "BASELINE",
    "NAMESPACE",
    "Coordinator",
    "get_coordinator",
    "round_file",
    "start_coordinator",
]
