"""cluster.yaml is a valid Ray cluster-launcher config (Ray's own schema) with the node types the README names."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(config))  # raises on a schema violation
    types = config["available_node_types"]
    assert {"head", "cpu", "gpu_l4", "gpu_a10", "gpu_train"} <= set(types)
    assert types["head"]["resources"] == {"CPU": 0}
    assert all(t["min_workers"] == 0 for name, t in types.items() if name != "head")
    assert config["idle_timeout_minutes"] > 0


def test_schema_check_is_real():
    import pytest
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config["available_node_types"]["cpu"]["max_wrkers"] = 3
    with pytest.raises(Exception, match="max_wrkers|Additional properties"):
        validate_config(prepare_config(config))
