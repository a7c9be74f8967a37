import dataclasses
import json
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


# -- nested configs: the service holds the library's config, one source for each default -----
def test_a_nested_config_is_set_by_its_own_flags_and_env_and_keeps_its_declared_defaults():
    from apmae.cluster import ClusterConfig
    from services.demo import DemoConfig

    cfg = resolve(DemoConfig, {"min_samples": "3"}, env={"APMAE_ITERATIONS": "42"})
    assert cfg.cluster == ClusterConfig(min_cluster_size=10, min_samples=3)  # the demo's 10 kept
    assert cfg.classifier.iterations == 42 and cfg.classifier.folds == 10
    assert ClusterConfig().min_cluster_size == 25  # the library's default (the paper's) is untouched


def test_two_settings_of_one_name_are_refused():
    from apmae.config import flat_fields, setting

    @dataclasses.dataclass(frozen=True)
    class Inner:
        depth: int = setting(1, "")

    @dataclasses.dataclass(frozen=True)
    class Outer:
        depth: int = setting(2, "")
        inner: Inner = dataclasses.field(default_factory=Inner)

    with pytest.raises(TypeError, match="'depth' is declared by both Outer and Inner"):
        flat_fields(Outer)


def test_a_saved_config_repeats_the_run_and_flags_still_win(tmp_path):
    from apmae.config import load
    from services.cluster import ClusterServiceConfig

    cfg = resolve(ClusterServiceConfig, {"min_cluster_size": "7", "n_epochs": "50", "redis_url":
                                         "redis://:pw@127.0.0.1:1/0"}, env={})
    path = save(cfg, tmp_path / "config.json")
    again = load(ClusterServiceConfig, path, env={"APMAE_REDIS_URL": "redis://:pw@127.0.0.1:1/0"})
    assert again == cfg  # the password was never saved: it came from the environment again
    assert load(ClusterServiceConfig, path, {"min_cluster_size": "9"}, env={}).cluster.min_cluster_size == 9
    with pytest.raises(ValueError, match="holds a ClusterServiceConfig"):
        load(BusConfig, path, env={})


def test_the_cli_reads_a_saved_config(tmp_path):
    from click.testing import CliRunner

    from services.cli import main

    res = CliRunner().invoke(main, ["cluster", "plan", "--help"])
    assert "--config FILE" in res.output and "--min-cluster-size INTEGER" in res.output
    assert "default: 25" in res.output.split("--min-cluster-size")[1][:300]


def test_the_demo_and_the_study_can_run_the_broker_in_memory(tmp_path):
    from services.demo import Demo, DemoConfig
    from services.study import Study, StudyConfig

    assert Demo(resolve(DemoConfig, {"state_dir": tmp_path / "d"}, env={})).infra.ephemeral is False  # durable
    assert Demo(resolve(DemoConfig, {"state_dir": tmp_path / "d", "ephemeral": True}, env={})).infra.ephemeral
    study = Study(resolve(StudyConfig, {"state_dir": tmp_path / "s", "ephemeral": "1"}, env={}))
    assert study.infra.ephemeral is True and study.cfg.state_dir == tmp_path / "s"


def test_a_prefixed_nested_config_is_set_by_its_prefixed_names_and_saved_nested(tmp_path):
    """The training recipe is one config: the trainer holds it unprefixed (--steps), the demo
    as ``train`` behind ``train_`` (--train-steps); a saved demo config reads back the same."""
    from apmae.config import load
    from apmae.recipe import TrainingConfig
    from services.demo import DemoConfig
    from services.trainer import TrainerConfig

    demo = resolve(DemoConfig, {"train_steps": "7"}, env={"APMAE_TRAIN_BATCH_SIZE": "5", "APMAE_SEED": "3"})
    assert demo.train == TrainingConfig(steps=7, batch_size=5, lr=1e-3)  # the demo's declared lr kept
    assert demo.classifier.seed == 3 and demo.train.seed == 0  # no collision: the recipe's is train_seed
    assert TrainingConfig().lr == 0.0  # the library's default untouched
    trainer = resolve(TrainerConfig, {"steps": "9", "epochs": "2"}, env={})
    assert trainer.train.steps == 9 and trainer.train.epochs == 2
    with pytest.raises(ValueError, match="unknown DemoConfig settings"):
        resolve(DemoConfig, {"steps": "9"}, env={})  # in the demo the recipe's names are prefixed
    saved = json.loads(save(demo, tmp_path / "demo.json").read_text())["config"]
    assert saved["train"]["steps"] == 7 and "train_steps" not in saved
    assert load(DemoConfig, tmp_path / "demo.json", env={}) == demo


def test_the_cli_flags_of_the_recipe(tmp_path):
    from click.testing import CliRunner

    from services.cli import main

    demo = CliRunner().invoke(main, ["demo", "--help"]).output
    assert "--train-batch-size INTEGER" in demo and "--train-variant TEXT" in demo and "APMAE_TRAIN_STEPS" in demo
    train = CliRunner().invoke(main, ["train", "--help"]).output
    assert "--batch-size INTEGER" in train and "--train-batch-size" not in train


def test_the_mining_plan_is_one_config_held_by_the_producer_the_demo_and_the_study():
    from apmae.mining import MiningConfig
    from services.producer import ProducerConfig
    from services.study import StudyConfig

    study = resolve(StudyConfig, {"held_out_files": "0.1", "mine_per_task": "50"}, env={})
    assert study.mining.split.held_out_files == 0.1 and study.mining.mine_per_task == 50
    assert study.mining.forward_full_tasks is False and study.mining.mine_layers == "0,10,20,29"  # declared
    producer = resolve(ProducerConfig, {"train_share": "0.5"}, env={})
    assert producer.split.train_share == 0.5 and producer.mining.forward_full_tasks is True
    assert MiningConfig().mine_per_task == 10_000  # the library's default, untouched by the study's
