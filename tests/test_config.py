"""Run-config validation: clear errors naming the key, and one source of truth for defaults."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fl_ietagc.config import ConfigError, RunConfig, config_keys, parse_config
from fl_ietagc.data import load_splits
from fl_ietagc.shards import shards_for_config
from strategies.registry import check_strategy

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_run_config_equals_typed_defaults():
    app_cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert app_cfg == RunConfig().to_dict()
    assert parse_config(app_cfg) == RunConfig()


def test_readme_documents_every_key():
    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"^\| `([a-z0-9-]+)` \|", readme, flags=re.M))
    assert documented == {f.metadata["key"] for f in config_keys()}


@pytest.mark.parametrize("raw, key", [
    ({"dataset": "imagenet"}, "dataset"),
    ({"preset": "huge"}, "preset"),
    ({"agc-lambda": 0}, "agc-lambda"),
    ({"agc-lambda": -1.5}, "agc-lambda"),
    ({"local-epochs": 0}, "local-epochs"),
    ({"local-epochs": -3}, "local-epochs"),
    ({"num-server-rounds": 0}, "num-server-rounds"),
    ({"lr": "fast"}, "lr"),
    ({"agc": 1}, "agc"),
    ({"batch-size": 1.5}, "batch-size"),
    ({"ema-decay": 1.0}, "ema-decay"),
    ({"sharding": "by-colour"}, "sharding"),
    ({"beta-start": 0.03}, "beta-end"),
    ({"dataset": "folder"}, "data-root"),
    ({"data-root": "/somewhere"}, "data-root"),
    ({"image-size": 20}, "image-size"),
])
def test_bad_values_name_the_key(raw, key):
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)} ="):
        parse_config(raw)


def test_unknown_key_is_rejected():
    with pytest.raises(ConfigError, match="unknown run-config key.*agc-lamda"):
        parse_config({"agc-lamda": 2.0})


def test_int_accepted_for_float_and_replace_validates():
    cfg = parse_config({"lr": 1})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    with pytest.raises(ConfigError, match="agc-lambda"):
        cfg.replace(**{"agc-lambda": 0.0})


def test_unknown_strategy():
    with pytest.raises(ConfigError, match="^strategy = 'fedmagic'"):
        check_strategy("fedmagic")


def test_missing_data_path():
    cfg = parse_config({"dataset": "folder", "data-root": "/no/such/folder"})
    with pytest.raises(ConfigError, match="^data-root = '/no/such/folder': path does not exist"):
        load_splits(cfg)


def test_more_clients_than_images():
    cfg = parse_config({"max-images": 10, "batch-size": 1})
    with pytest.raises(ConfigError, match="^num-clients = 20: 10 training images"):
        shards_for_config(cfg, 20)


def test_batch_larger_than_shard():
    cfg = parse_config({"max-images": 100, "batch-size": 64})
    with pytest.raises(ConfigError, match="^num-clients = 4"):
        shards_for_config(cfg, 4)


def test_flower_simulation_rejects_bad_config_before_starting_ray():
    proc = subprocess.run([sys.executable, "-m", "experiments.simulate", "--app", str(ROOT), "--num-supernodes", "2",
                           "--run-config", "agc-lambda=-1"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert "agc-lambda = -1.0: must be > 0" in proc.stderr
    assert "ray" not in proc.stderr.lower()


def test_flower_simulation_rejects_unknown_key():
    proc = subprocess.run([sys.executable, "-m", "experiments.simulate", "--app", str(ROOT), "--num-supernodes", "2",
                           "--run-config", "no-such-key=1"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode != 0 and "no-such-key" in proc.stderr
