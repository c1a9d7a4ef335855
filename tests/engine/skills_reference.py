"""The skills stage's assembly as it was before pass 2 ran in tasks (every pool row's
(id, key) joined in the driver): kept verbatim from engine/skills_store.py, only as the
oracle that tests/engine/test_skills_store.py and tests/jobs/test_skills_job.py hold the
per-part assembly to, row for row.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from engine.skills import PROMPT_VERSION, SKILLS_SCHEMA


def assemble(ids: pa.Table, cached: pa.Table, failures: pa.Table, model: str) -> pa.Table:
    """One ``SKILLS_SCHEMA`` row per id: its key's cached success, else its recorded failure."""
    n_ok, n_bad = cached.num_rows, failures.num_rows
    results = pa.table(
        {
            "key": pa.concat_arrays(
                [cached.column("key").combine_chunks(), failures.column("key").combine_chunks()]
            ),
            "skills": pa.concat_arrays(
                [
                    cached.column("skills").combine_chunks(),
                    failures.column("skills").combine_chunks(),
                ]
            ),
            "skill_text": pa.concat_arrays(
                [
                    cached.column("skill_text").combine_chunks(),
                    failures.column("skill_text").combine_chunks(),
                ]
            ),
            "raw": pa.concat_arrays(
                [cached.column("raw").combine_chunks(), failures.column("raw").combine_chunks()]
            ),
            "status": pa.concat_arrays(
                [pa.repeat(pa.scalar("ok"), n_ok), pa.repeat(pa.scalar("failed"), n_bad)]
            ),
            "reason": pa.concat_arrays(
                [pa.nulls(n_ok, pa.string()), failures.column("reason").combine_chunks()]
            ),
        }
    )
    # index_in finds a key's first row: a key is in cached once, and failures are not cached.
    rows = pc.index_in(ids.column("key"), value_set=results.column("key"))
    if rows.null_count:
        raise RuntimeError(
            f"{rows.null_count} pool ids got no skills row (rows lost); nothing was committed"
        )
    out = results.take(rows)
    n = ids.num_rows
    return pa.table(
        {
            "id": ids.column("id"),
            **{c: out.column(c) for c in ("skills", "skill_text", "raw", "status", "reason")},
            "prompt_version": pa.repeat(pa.scalar(PROMPT_VERSION), n),
            "model": pa.repeat(pa.scalar(model), n),
        }
    ).cast(SKILLS_SCHEMA)
