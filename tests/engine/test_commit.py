"""engine.commit on local disk and on a real S3-compatible server: attempts, resume, commit."""

from __future__ import annotations

import uuid

import pyarrow as pa
import pytest
from pydantic import BaseModel, ConfigDict, Field

from engine import commit
from engine.artifacts import Artifact, Meta
from engine.commit import ATTEMPTS, MANIFEST, added_later, operational, output_config
from engine.errors import InputError
from engine.resources import Resources
from engine.workspace import Workspace


class Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    depth: int = Field(3, description="changes the output")
    threads: int = operational(1, description="does not")


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k: int = Field(10, description="changes the output")
    inner: Inner = Field(default_factory=Inner, description="a nested model")
    overwrite: bool = operational(False, description="how, not what")
    resources: Resources = operational(default_factory=Resources, description="where")


class ThingMeta(Meta):
    rows: int


class Thing(Artifact[ThingMeta]):
    KIND, META, FOLDER, NAMED = "thing", ThingMeta, ("things",), True

    @classmethod
    def command(cls, ws, name):
        return f"make-thing {name}"


@pytest.fixture(params=["local", "s3"])
def ws(request, tmp_path):
    if request.param == "local":
        return Workspace.open(str(tmp_path / "ws"))
    server = request.getfixturevalue("s3_server")
    return Workspace.open(server.uri(f"commit-{request.node.originalname}-{uuid.uuid4().hex[:6]}"))


def test_operational_fields_leave_the_fingerprint_alone():
    plain = StageConfig()
    moved = StageConfig(overwrite=True, resources=Resources(num_cpus=4), inner=Inner(threads=8))
    assert output_config(plain) == {"k": 10, "inner": {"depth": 3}}
    assert commit.fingerprint(config=plain) == commit.fingerprint(config=moved)
    assert commit.fingerprint(config=plain) != commit.fingerprint(config=StageConfig(k=11))
    assert commit.fingerprint(config=plain) != commit.fingerprint(
        config=StageConfig(inner=Inner(depth=4))
    )
    assert commit.fingerprint(config=plain, inputs={"pool": "a"}) != commit.fingerprint(
        config=plain, inputs={"pool": "b"}
    )


class Grown(StageConfig):
    turns: int = added_later(1, description="added after StageConfig artifacts existed")


def test_a_field_added_later_counts_only_away_from_its_default():
    # artifacts made before the field existed keep their fingerprint; other values count
    assert commit.fingerprint(config=Grown()) == commit.fingerprint(config=StageConfig())
    assert output_config(Grown(turns=3)) == {"k": 10, "inner": {"depth": 3}, "turns": 3}
    assert commit.fingerprint(config=Grown(turns=3)) != commit.fingerprint(config=Grown())


def test_a_single_turn_world_keeps_its_fingerprint_and_the_base_ignores_turns():
    from engine.llava import BaseTrainConfig, LlavaModelConfig
    from engine.llava.cache import base_fingerprint
    from engine.world.config import WorldConfig

    assert "turns" not in output_config(WorldConfig())
    assert output_config(WorldConfig(turns=3))["turns"] == 3
    model, train = LlavaModelConfig(), BaseTrainConfig()
    assert base_fingerprint(WorldConfig(turns=3), model, train) == base_fingerprint(
        WorldConfig(), model, train
    )


def _write(ws: Workspace, name: str, rows: int, inputs=None, **how):
    plan = Thing.begin(ws, name, inputs=inputs or {"pool": "p1"}, config=StageConfig(), **how)
    if plan.action == "current":
        return plan, None
    ws.write_table(plan.attempt.path("part-0.parquet"), pa.table({"x": list(range(rows))}))
    ws.write_json(plan.attempt.path("sub", "note.json"), {"rows": rows})
    return plan, Thing.committed(ws, name, plan.attempt.commit(ThingMeta(rows=rows)))


def test_commit_publishes_the_attempt_and_names_every_file(ws):
    plan, thing = _write(ws, "a", 5)
    assert plan.action == "start" and plan.manifest is None
    opened = Thing.open(ws, "a")
    assert opened.meta.rows == 5 and opened.fingerprint == plan.attempt.fingerprint
    assert opened.manifest.inputs == {"pool": "p1"}
    assert sorted(opened.manifest.files) == ["part-0.parquet", "sub/note.json"]
    assert all(size > 0 for size in opened.manifest.files.values())
    assert opened.files(suffix=".parquet") == [opened.path("part-0.parquet")]
    assert opened.read_table().column("x").to_pylist() == [0, 1, 2, 3, 4]
    # a path an artifact hands out is taken as it is by the workspace (S3 roots have no '/')
    assert ws.list_files(opened.path("sub")) == [opened.path("sub", "note.json")]
    # the same inputs and config again: current, nothing written
    again, _ = _write(ws, "a", 99)
    assert again.action == "current" and Thing.open(ws, "a").meta.rows == 5


def test_a_new_fingerprint_keeps_the_old_artifact_readable_until_it_commits(ws):
    _write(ws, "a", 5)
    old = Thing.open(ws, "a")
    plan = Thing.begin(ws, "a", inputs={"pool": "p2"}, config=StageConfig())
    assert plan.action == "start"
    ws.write_table(plan.attempt.path("part-0.parquet"), pa.table({"x": [7]}))
    # killed here, before its manifest: readers still see the old artifact, whole
    still = Thing.open(ws, "a")
    assert still.manifest == old.manifest
    assert still.read_table().num_rows == 5
    plan.attempt.commit(ThingMeta(rows=1))
    new = Thing.open(ws, "a")
    assert new.meta.rows == 1 and new.read_table().column("x").to_pylist() == [7]
    # the old attempt is cleaned up after the commit
    assert commit.attempt_ids(ws, Thing.folder(ws, "a")) == [new.manifest.attempt]


def test_an_interrupted_attempt_resumes_only_with_the_same_fingerprint(ws):
    first = Thing.begin(ws, "r", inputs={"pool": "p1"}, config=StageConfig())
    first.attempt.write_state({"fitted": True})
    ws.write_json(first.attempt.path("shard-0.json"), {"done": 1})
    with pytest.raises(InputError, match="did not finish.*resume"):
        Thing.open(ws, "r")
    resumed = Thing.begin(ws, "r", inputs={"pool": "p1"}, config=StageConfig(overwrite=True))
    assert resumed.action == "resume" and resumed.attempt.id == first.attempt.id
    assert resumed.attempt.read_state() == {"fitted": True}
    assert resumed.attempt.exists("shard-0.json")
    other = Thing.begin(ws, "r", inputs={"pool": "p2"}, config=StageConfig())
    assert other.action == "start" and other.attempt.id != first.attempt.id
    assert commit.attempt_ids(ws, Thing.folder(ws, "r")) == [other.attempt.id]
    forced = Thing.begin(ws, "r", inputs={"pool": "p2"}, config=StageConfig(), overwrite=True)
    assert forced.action == "start" and forced.attempt.id != other.attempt.id


def test_bookkeeping_scratch_and_temporaries_are_not_committed(ws):
    plan = Thing.begin(ws, "b", config=StageConfig())
    attempt = plan.attempt
    attempt.write_state({"k": 1})
    ws.write_bytes(attempt.path("_scratch", "part.bin"), b"x")
    ws.write_bytes(attempt.path("_parts", "p.parquet"), b"x")
    ws.write_bytes(attempt.path(".data.tmp-1234"), b"half")
    ws.write_bytes(attempt.path("data.bin"), b"whole")
    manifest = attempt.commit(ThingMeta(rows=0))
    assert manifest.files == {"data.bin": 5}


def test_missing_and_foreign_manifests_are_refused_with_the_fix(ws):
    with pytest.raises(InputError, match="thing 'none' is missing.*holds none.*make-thing none"):
        Thing.open(ws, "none")
    ws.write_json(f"{Thing.folder(ws, 'bad')}/{MANIFEST}", {"kind": "thing"})
    with pytest.raises(InputError, match="not a manifest this version.*--overwrite"):
        Thing.open(ws, "bad")


def test_the_layout_is_an_attempt_folder_and_one_manifest(ws):
    _, thing = _write(ws, "l", 2)
    folder = Thing.folder(ws, "l")
    assert thing.dir == f"{folder}/{ATTEMPTS}/{thing.manifest.attempt}"
    assert ws.exists(folder.removeprefix(ws.root + "/"), MANIFEST)


def test_a_refused_change_writes_nothing(ws):
    _write(ws, "f", 3)
    folder = Thing.folder(ws, "f")
    before = commit.attempt_ids(ws, folder)
    with pytest.raises(InputError, match="holds another thing .* was [0-9a-f]{16}, now"):
        Thing.begin(ws, "f", inputs={"pool": "p9"}, config=StageConfig(),
                    refuse_change="holds another thing (fingerprint was {old}, now {new})")  # fmt: skip
    assert commit.attempt_ids(ws, folder) == before
    forced = Thing.begin(ws, "f", inputs={"pool": "p9"}, config=StageConfig(), overwrite=True,
                         refuse_change="never raised with overwrite")  # fmt: skip
    assert forced.action == "start"


def test_an_abandoned_attempt_leaves_no_folder_behind(ws):
    plan = Thing.begin(ws, "gone", config=StageConfig())
    ws.write_bytes(plan.attempt.path("part.bin"), b"x")
    plan.attempt.abandon()
    assert not ws.exists("things")  # the attempt, its artifact folder and their parent
    _write(ws, "kept", 1)
    other = Thing.begin(ws, "gone", config=StageConfig()).attempt
    other.abandon()
    assert Thing.open(ws, "kept").meta.rows == 1  # a folder that holds more stays
