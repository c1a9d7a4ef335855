"""The one loader: a tiny random LLaVA saved in the Hugging Face layout with its processor
loads from a folder and from a real S3-compatible server; other folders are refused,
saying what they hold."""

from __future__ import annotations

import json
import os
import uuid

import pyarrow.fs as pafs
import pytest

from engine.errors import InputError
from engine.llava import inspect_checkpoint, load_checkpoint
from engine.llava.checkpoint import local_folder
from tests.tiny_llava import save_random_llava


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A random tiny LLaVA and its processor, saved as llava-hf ships them."""
    folder = tmp_path_factory.mktemp("ckpt") / "tiny-llava-hf"
    return folder, save_random_llava(folder)


def test_a_saved_checkpoint_loads_with_its_processor_and_the_same_weights(saved):
    folder, model = saved
    loaded = load_checkpoint(str(folder))
    assert type(loaded.model).__name__ == "LlavaForConditionalGeneration"
    assert type(loaded.processor).__name__ == "LlavaProcessor"
    assert loaded.tokenizer.chat_template and loaded.max_length == 256  # capped at positions
    for (name, want), got in zip(
        model.state_dict().items(), loaded.model.state_dict().values(), strict=True
    ):
        assert want.equal(got), name
    half = load_checkpoint(str(folder), dtype="bf16", max_length=100)
    assert next(half.model.parameters()).dtype.is_floating_point and half.max_length == 100
    assert str(next(half.model.parameters()).dtype) == "torch.bfloat16"


def test_folders_that_are_not_a_llava_checkpoint_are_refused_saying_what_they_hold(saved, tmp_path):
    with pytest.raises(InputError, match="not found"):
        inspect_checkpoint(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(InputError, match=r"no config.json.*found: notes.txt"):
        inspect_checkpoint(str(tmp_path / "empty"))
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(
        json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    )
    with pytest.raises(InputError, match=r"'llama' checkpoint \(architectures: LlamaForCausalLM"):
        inspect_checkpoint(str(llama))
    bare = tmp_path / "bare"
    bare.mkdir()
    folder, _ = saved
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((folder / name).read_bytes())
    with pytest.raises(InputError, match="without the tokenizer.*and the image processor"):
        inspect_checkpoint(str(bare))
    os.remove(bare / "model.safetensors")
    with pytest.raises(InputError, match="without weights"):
        inspect_checkpoint(str(bare))


def test_a_checkpoint_on_s3_loads_through_one_node_cache_copy(
    saved, s3_server, tmp_path, monkeypatch
):
    folder, model = saved
    monkeypatch.setenv("VLSELECT_MODEL_CACHE", str(tmp_path / "cache"))
    prefix = f"models-{uuid.uuid4().hex[:6]}/tiny-llava-hf"
    fs = s3_server.fs()
    pafs.copy_files(
        str(folder), f"{s3_server.bucket}/{prefix}",
        source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs,
    )  # fmt: skip
    info = inspect_checkpoint(s3_server.uri(prefix))
    assert info.uri.startswith("s3://") and info.weight_bytes > 0
    loaded = load_checkpoint(info)
    first = next(iter(model.state_dict().values()))
    assert first.equal(next(iter(loaded.model.state_dict().values())))
    again = local_folder(info)
    assert os.listdir(tmp_path / "cache") == [info.fingerprint]  # one copy, no partials
    assert again == str(tmp_path / "cache" / info.fingerprint)
