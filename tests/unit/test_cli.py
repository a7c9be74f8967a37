"""The command line: `apmae --help` without importing the ML stack, typed options, choices
validated from flags and environment alike."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from apmae.config import BusConfig, resolve
from services.cli import main


def test_top_level_help_imports_no_torch_or_transformers():
    code = ("import sys; from click.testing import CliRunner; from services.cli import main; "
            "r = CliRunner().invoke(main, ['--help']); assert r.exit_code == 0, r.output; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_command_shows_its_typed_options_on_first_use():
    res = CliRunner().invoke(main, ["encode", "--help"])
    assert res.exit_code == 0, res.output
    assert "--batch-size INTEGER" in res.output and "[auto|none|gzip|lz4|zstd]" in res.output


@pytest.mark.parametrize("argv", [["encode", "--batch-size", "many"], ["encode", "--compression", "snappyy"],
                                  ["produce", "--security-protocol", "plaintext"]])
def test_bad_values_are_refused_before_anything_starts(argv):
    res = CliRunner().invoke(main, argv)
    assert res.exit_code == 2 and "Invalid value" in res.output, res.output


def test_choices_hold_for_environment_variables_too():
    with pytest.raises(ValueError, match="compression: 'snappyy' is not one of"):
        resolve(BusConfig, env={"APMAE_COMPRESSION": "snappyy"})
    assert resolve(BusConfig, env={"APMAE_COMPRESSION": "lz4"}).compression == "lz4"


def test_an_unreachable_broker_fails_fast_in_one_line():
    from services.infra import free_port

    res = CliRunner().invoke(main, ["topics", "--bootstrap-servers", f"127.0.0.1:{free_port()}"])
    assert res.exit_code == 1
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "no Kafka broker reachable" in lines[0] and "apmae infra up" in lines[0], res.output


def test_verbosity_levels_and_json_logs(capsys):
    import json
    import logging

    from services.runtime import setup_logging

    try:
        setup_logging(0, json_format=True)
        logging.getLogger("apmae.test").info("started %d", 3)
        logging.getLogger("apmae.test").debug("hidden")
        line = capsys.readouterr().err.strip()
        assert json.loads(line) | {"ts": None} == {"ts": None, "level": "INFO", "logger": "apmae.test",
                                                   "message": "started 3"}
        setup_logging(1)  # -v: apmae's debug lines, not the Kafka client's
        assert logging.getLogger("apmae.x").isEnabledFor(logging.DEBUG)
        assert not logging.getLogger("kafka.conn").isEnabledFor(logging.INFO)
        setup_logging(2)
        assert logging.getLogger("kafka.conn").isEnabledFor(logging.DEBUG)
    finally:
        setup_logging(0)


def test_every_command_that_prints_a_result_offers_json():
    """Commands whose output is text for people take --json; the service loops print JSON already."""
    for argv in (["infra", "up"], ["infra", "down"], ["infra", "status"], ["topics"], ["classify", "fit"],
                 ["intervene"], ["demo"], ["study"]):
        res = CliRunner().invoke(main, [*argv, "--help"])
        assert res.exit_code == 0 and "--json" in res.output, argv


def test_eval_on_parquet_files_needs_no_broker(tmp_path):
    from apmae.mae import APMAE, save_pretrained, variant
    from services.infra import free_port

    ck = save_pretrained(APMAE(variant("tiny", pattern_size=64, patch_size=16)), tmp_path / "ck")
    (tmp_path / "pq").mkdir()
    broker = ["--bootstrap-servers", f"127.0.0.1:{free_port()}"]
    offline = CliRunner().invoke(main, ["eval", "--checkpoint", str(ck), "--source", f"parquet:{tmp_path / 'pq'}",
                                        *broker])
    assert "no Kafka broker reachable" not in offline.output, offline.output
    online = CliRunner().invoke(main, ["eval", "--checkpoint", str(ck), *broker])  # the default source is a topic
    assert online.exit_code == 1 and "no Kafka broker reachable" in online.output


def test_the_loop_options_reach_a_command_as_one_run_limits():
    """Every consuming command takes --max-messages, --idle-timeout and --until-caught-up as
    one RunLimits (handed to Processor.run as it is), not three values threaded by hand."""
    import click

    from services.bus import RunLimits
    from services.runtime import loop_options

    got: list[RunLimits] = []

    @click.command()
    @loop_options
    def cmd(limits: RunLimits) -> None:
        got.append(limits)

    assert CliRunner().invoke(cmd, ["--max-messages", "5", "--idle-timeout", "2", "--until-caught-up"]).exit_code == 0
    assert CliRunner().invoke(cmd, []).exit_code == 0
    assert got == [RunLimits(max_messages=5, idle_timeout_s=2.0, until_caught_up=True), RunLimits()]
    for name in ("encode", "produce", "assign"):
        helptext = CliRunner().invoke(main, [name, "--help"]).output
        assert all(flag in helptext for flag in ("--max-messages", "--idle-timeout", "--until-caught-up")), name
