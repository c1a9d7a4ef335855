"""Config layers: merge order, --set parsing, unknown keys named, bad files refused."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ConfigDict, Field

from engine.config import build_config, deep_merge, load_yaml_file, parse_set_overrides
from engine.errors import InputError


class Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_cpus: float = Field(1.0, description="cpus")


class Demo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    size: int = Field(10, ge=1, description="size")
    name: str = Field("x", description="name")
    inner: Inner = Field(default_factory=Inner, description="inner")


def test_later_layers_win_and_nested_merge():
    cfg = build_config(
        "world",
        Demo,
        {"world": {"size": 3, "inner": {"num_cpus": 0.5}}},
        None,
        {"world": {"name": "y"}},
    )
    assert (cfg.size, cfg.name, cfg.inner.num_cpus) == (3, "y", 0.5)
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"b": 5}}) == {"a": {"b": 5, "c": 2}}


def test_unknown_key_is_named_with_the_allowed_ones():
    with pytest.raises(InputError) as err:
        build_config("world", Demo, {"world": {"szie": 3}})
    assert "unknown key 'szie'" in str(err.value) and "size" in str(err.value)
    with pytest.raises(InputError, match="unknown key 'inner.gpus'.*num_cpus"):
        build_config("world", Demo, {"world": {"inner": {"gpus": 1}}})


def test_bad_value_names_key_and_input():
    with pytest.raises(InputError, match=r"size: .*got 0"):
        build_config("world", Demo, {"world": {"size": 0}})


def test_set_overrides_parse_yaml_values():
    assert parse_set_overrides(["a.b=3", "c=[1, 2]", "d=true", "e=text"]) == {
        "a": {"b": 3},
        "c": [1, 2],
        "d": True,
        "e": "text",
    }
    with pytest.raises(InputError, match="KEY=VALUE"):
        parse_set_overrides(["novalue"])


def test_yaml_file_checks(tmp_path):
    good = tmp_path / "c.yaml"
    good.write_text("world:\n  size: 5\n")
    assert load_yaml_file(good) == {"world": {"size": 5}}
    bad_section = tmp_path / "s.yaml"
    bad_section.write_text("wrld:\n  size: 5\n")
    assert load_yaml_file(bad_section) == {"wrld": {"size": 5}}  # no sections named: any
    with pytest.raises(InputError, match="unknown section.*wrld.*known sections are world"):
        load_yaml_file(bad_section, sections=["world", "ingest"])
    not_yaml = tmp_path / "n.yaml"
    not_yaml.write_text("world: [unclosed\n")
    with pytest.raises(InputError, match="not valid YAML"):
        load_yaml_file(not_yaml)
    listy = tmp_path / "l.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(InputError, match="mapping"):
        load_yaml_file(listy)
    with pytest.raises(InputError, match="not found"):
        load_yaml_file(tmp_path / "missing.yaml")


def test_a_partial_mapping_adjusts_a_default_sub_config_and_a_full_one_replaces_it():
    from jobs import embed

    def embed_cfg(section: dict):
        return build_config("embed", embed.CONFIG, {"embed": section})

    default = embed.CONFIG()
    # A user's own workspace has no embed section: the README's GPU flags keep the encoder.
    cfg = embed_cfg({"clip": {"max_actors": 8, "actor": {"num_gpus": 1}}})
    assert cfg.clip.encoder == default.clip.encoder and cfg.clip.max_actors == 8
    assert (cfg.clip.actor.num_cpus, cfg.clip.actor.num_gpus) == (0.5, 1)  # the default's 0.5
    cfg = embed_cfg({"text": {"encoder": {"torch_threads": 2}}})
    assert cfg.text.encoder.model == default.text.encoder.model
    assert cfg.text.encoder.torch_threads == 2
    # Naming the encoder's own fields is a new encoder: nothing of the default's leaks in.
    tiny = {"kind": "open_clip", "model": "tiny-clip", "weights": "random"}
    cfg = embed_cfg({"clip": {"encoder": tiny}})
    assert cfg.clip.encoder.pretrained is None and default.clip.encoder.pretrained == "openai"
    assert (
        cfg.clip.encoder.fingerprint()
        == embed.CONFIG.model_validate({"clip": {"encoder": tiny}}).clip.encoder.fingerprint()
    )
    with pytest.raises(InputError, match="kind"):
        embed_cfg({"clip": {"encoder": {"model": "ViT-B-32", "device": "cpu"}}})
