import dataclasses
from pathlib import Path

import pytest

from apmae.config import BusConfig, resolve, save


def test_defaults_env_and_overrides_in_order():
    env = {"APMAE_BOOTSTRAP_SERVERS": "127.0.0.1:1", "APMAE_MAX_MESSAGE_BYTES": "123"}
    cfg = resolve(BusConfig, {"max_message_bytes": "456"}, env=env)
    assert cfg.bootstrap_servers == "127.0.0.1:1"  # env beats default
    assert cfg.max_message_bytes == 456  # flag beats env, and is typed
    assert cfg.compression == "zstd"


def test_unknown_keys_and_bad_values_are_errors():
    with pytest.raises(ValueError, match="unknown BusConfig settings"):
        resolve(BusConfig, {"bootstrap_server": "x"}, env={})
    with pytest.raises(ValueError, match="max_message_bytes"):
        resolve(BusConfig, {}, env={"APMAE_MAX_MESSAGE_BYTES": "lots"})


def test_config_is_frozen_and_saved(tmp_path: Path):
    cfg = resolve(BusConfig, {"state_dir": str(tmp_path)}, env={})
    assert isinstance(cfg.state_dir, Path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.compression = "none"  # type: ignore[misc]
    text = save(cfg, tmp_path / "config.json").read_text()
    assert '"config_class": "BusConfig"' in text and str(tmp_path) in text
