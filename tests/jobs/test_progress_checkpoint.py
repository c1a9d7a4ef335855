"""``vlselect progress --model DIR`` with a Hugging Face LLaVA checkpoint that no vlselect
stage made: a tiny random ``LlavaForConditionalGeneration`` saved with ``save_pretrained``
beside its processor (tokenizer with llava-hf's chat template, CLIP image processor), over a
pool of three-turn conversations, on two Ray Train workers (DeepSpeed on gloo), under ZeRO-2
and ZeRO-3 with either metric; and what a round's checkpoint holds."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from engine.artifacts import Pool, ProgressRun
from engine.workspace import Workspace
from jobs.cli import main
from tests.jobs.test_progress_job import TINY_RUN, pool_with_spaces, summary_of
from tests.tiny_llava import save_random_llava

POOL = 200
TURNS = 3
# 40 rows: 18 warm-up, then 10, 10, 2; the shipped recipe's LoRA (no embedding training)
RUN = {**TINY_RUN, "budget": 0.2, "max_new_tokens": 6,
       "finetune": {**TINY_RUN["finetune"], "lora": {"r": 4, "alpha": 8,
                                                     "train_embeddings": False}}}  # fmt: skip


@pytest.fixture(scope="module")
def hf_run(ray_session, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(workspace of a three-turn pool with dino/text spaces, the checkpoint folder, config)."""
    ws = tmp_path_factory.mktemp("hf") / "ws"
    pool_with_spaces(ws, POOL, "--set", f"turns={TURNS}", clusters=8)
    model = tmp_path_factory.mktemp("checkpoints") / "tiny-llava-hf"
    save_random_llava(model)
    config = tmp_path_factory.mktemp("cfg") / "run.yaml"
    config.write_text(yaml.safe_dump({"progress": RUN}))
    return ws, model, config


def test_the_checkpoint_is_llava_hf_and_the_pool_is_three_turns(hf_run):
    ws, model, _ = hf_run
    names = {p.name for p in model.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "processor_config.json"} <= names, names  # fmt: skip
    # the image processor: in processor_config.json (transformers 5) or its own file
    processor = json.loads((model / "processor_config.json").read_text())
    assert "image_processor" in processor or "preprocessor_config.json" in names
    assert json.loads((model / "config.json").read_text())["model_type"] == "llava"
    rows = Pool.open(Workspace.open(str(ws))).read_table(["conversations"]).to_pylist()
    turns = [json.loads(r["conversations"]) if isinstance(r["conversations"], str)
             else r["conversations"] for r in rows]  # fmt: skip
    assert all(len(t) == 2 * TURNS for t in turns)
    assert all([m["from"] for m in t] == ["human", "gpt"] * TURNS for t in turns)


def _run(ws: Path, model: Path, config: Path, name: str, zero_stage: int, metric: str, capsys):
    argv = ["progress", "--workspace", str(ws), "--config", str(config), "--model", str(model),
            "--name", name, "--zero-stage", str(zero_stage), "--metric", metric]  # fmt: skip
    code = main(argv)
    assert code == 0, capsys.readouterr().err[-3000:]
    return summary_of(capsys.readouterr().out), ProgressRun.open(Workspace.open(str(ws)), name)


@pytest.mark.parametrize(
    "zero_stage, metric",
    [
        (3, "accuracy"),  # synced generation over balanced shards: the one that could hang
        pytest.param(2, "accuracy", marks=pytest.mark.slow),
        pytest.param(2, "loss", marks=pytest.mark.slow),
        pytest.param(3, "loss", marks=pytest.mark.slow),
    ],
)
def test_progress_on_a_hugging_face_llava_spends_the_budget_exactly(
    hf_run, capsys, zero_stage, metric
):
    ws, model, config = hf_run
    summary, run = _run(ws, model, config, f"hf{zero_stage}{metric}", zero_stage, metric, capsys)
    assert summary["spent"] == summary["budget"] == 40 and summary["revealed"] == 40
    run_dir = Path(run.dir)
    rounds = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["picks"] for r in rounds] == [18, 10, 10, 2]
    assert all(r["delta"] for r in rounds[1:])  # every selection round scored its clusters
    files = sorted((run_dir / "rounds").glob("round-*.parquet"))
    ids = [i for f in files for i in pq.read_table(f).column("id").to_pylist()]
    assert len(ids) == len(set(ids)) == 40  # nothing picked twice
    selected = json.loads((run_dir / "selected.json").read_text())
    assert [len(r["conversations"]) for r in selected] == [2 * TURNS] * 40  # whole, as given
    trained = run.meta.summary["train_rounds"]
    assert sum(r["rows"] for r in trained) == 40
    assert run.meta.summary["final_metrics"]["round"] == 3
    assert (run_dir / "adapter" / "adapter_config.json").exists()
    # the run names the checkpoint it trained: its inputs carry its fingerprint
    assert run.manifest.inputs["model"] and run.meta.config["model"] == str(model)
    check_round_checkpoints(run_dir, model, zero_stage)
    # each rank staged its checkpoints in one local folder, removed once uploaded
    assert not list(Path(tempfile.gettempdir()).glob(f"vlselect-ckpt-{run_dir.name}-*"))


def check_round_checkpoints(run_dir: Path, model: Path, zero_stage: int) -> None:
    """Ray Train kept ``checkpoints_to_keep`` (2) of the four rounds' checkpoints; each holds
    the trainable weights (LoRA adapters, projector) and their optimizer state, none of the
    frozen base: as many parameters as the memory plan counts trainable, and fewer bytes than
    the model (at 7B: 341M trainable parameters, ~5 GB with Adam's state, against 14 GB)."""
    import torch
    from transformers import LlavaConfig

    from engine.llava.config import FinetuneConfig
    from engine.llava.memory import build_on_meta, count_parameters

    kept = sorted(p for p in (run_dir / "train").glob("checkpoint_*") if p.is_dir())
    assert len(kept) == 2, kept
    last = kept[-1]
    assert json.loads((last / "round.json").read_text()) == {"round": 3}
    state = [p for p in (last / "state").iterdir()]
    ranks = [p for p in state if p.name.endswith("_model_states.pt")]
    assert len([p for p in state if p.name.endswith("optim_states.pt")]) == 2  # a shard a rank
    saved = torch.load(ranks[0], weights_only=False)
    assert saved["frozen_param_shapes"] is None  # exclude_frozen_parameters
    shapes = {k: v for group in saved["param_shapes"] for k, v in group.items()}
    assert all("lora_" in k or "multi_modal_projector" in k for k in shapes), list(shapes)
    finetune = FinetuneConfig.model_validate(RUN["finetune"])
    meta_model = build_on_meta(LlavaConfig.from_pretrained(model))
    trainable = count_parameters(meta_model, finetune).trainable
    assert sum(s.numel() for s in shapes.values()) == trainable
    size = sum(p.stat().st_size for p in state)
    model_bytes = (model / "model.safetensors").stat().st_size
    print(f"ZeRO-{zero_stage} round checkpoint: {size:,} B ({trainable:,} trainable "
          f"parameters and their Adam state); model {model_bytes:,} B")  # fmt: skip
    assert size < model_bytes
