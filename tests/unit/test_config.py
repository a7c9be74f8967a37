import dataclasses
from pathlib import Path

import pytest

from apmae.config import BusConfig, resolve, save


def test_defaults_env_and_overrides_in_order():
    env = {"APMAE_BOOTSTRAP_SERVERS": "127.0.0.1:1", "APMAE_MAX_MESSAGE_BYTES": "123"}
    cfg = resolve(BusConfig, {"max_message_bytes": "456"}, env=env)
    assert cfg.bootstrap_servers == "127.0.0.1:1"  # env beats default
    assert cfg.max_message_bytes == 456  # flag beats env, and is typed
    assert cfg.compression == "auto"


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


def test_secrets_come_from_files_and_are_never_saved(tmp_path):
    import json

    from apmae.config import BusConfig, resolve, save

    secret = tmp_path / "sasl"
    secret.write_text("s3cr3t-from-file\n")
    env = {"APMAE_SASL_PASSWORD_FILE": str(secret), "APMAE_REDIS_URL": "redis://:hunter2@127.0.0.1:6379/0"}
    cfg = resolve(BusConfig, env=env)
    assert cfg.sasl_password == "s3cr3t-from-file" and "hunter2" in cfg.redis_url
    text = save(cfg, tmp_path / "config.json").read_text()
    assert "s3cr3t" not in text and "hunter2" not in text
    saved = json.loads(text)["config"]
    assert saved["sasl_password"] == "***" and saved["redis_url"] == "redis://:***@127.0.0.1:6379/0"
    with pytest.raises(ValueError, match="cannot read"):
        resolve(BusConfig, env={"APMAE_SASL_PASSWORD_FILE": str(tmp_path / "missing")})
