"""``apmae``: one entry point, a subcommand per job.

Options are generated from each service's config dataclass, so every option shows its
environment variable in ``--help`` (``APMAE_<FIELD>``) and a flag, an env variable and the
dataclass default are the same setting. Precedence: flag > env > default.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from apmae import config as C
from services.runtime import loop_options, run_loop, setup_logging, start_service, tune_allocator
from services.settings import ConfigGroup, build, config_options

if TYPE_CHECKING:
    from services.bus import RunLimits

log = logging.getLogger("apmae")


@click.group(cls=ConfigGroup)
@click.option("-v", "--verbose", count=True, help="More logging: -v apmae's debug lines, -vv everything (Kafka "
                                                   "client included)")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", envvar="APMAE_LOG_FORMAT",
              show_default=True, help="json: one object per line, for log shippers  [env: APMAE_LOG_FORMAT]")
def main(verbose: int, log_format: str) -> None:
    """apmae: mine the attention patterns of code LLMs at scale (AP-MAE), on Kafka."""
    setup_logging(verbose, log_format == "json")
    tune_allocator()


# every command that prints a result can print it as one JSON document instead
JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON")


# -- infra -------------------------------------------------------------------------------------
@main.group()
def infra() -> None:
    """Embedded broker (Tansu; durable on a local S3 server, or --ephemeral), Redis and Prometheus on 127.0.0.1."""


def _infra_cfg(kw: dict[str, Any]):
    from services.infra import InfraConfig

    return build(InfraConfig, kw)


def _components(only: str | None) -> tuple[str, ...]:
    return tuple(only.split(",")) if only else ("broker", "redis", "prometheus")


@infra.command("up")
@click.option("--only", default=None, help="Comma-separated subset: broker,redis,prometheus")
@click.option("--adopt-generation", is_flag=True,
              help="Record the running broker's generation in Redis (after resetting state of a lost log)")
@config_options("services.infra:InfraConfig")
@JSON_OPTION
def infra_up(only: str | None, adopt_generation: bool, as_json: bool, **kw: Any) -> None:
    """Start the servers (idempotent) and wait until each is healthy."""
    from services import infra as I

    cfg = _infra_cfg(kw)
    states = I.up(cfg, _components(only), adopt_generation)
    if as_json:
        click.echo(json.dumps({"servers": states, "bootstrap_servers": cfg.bootstrap_servers,
                               "redis_url": C.redact("redis_url", cfg.redis_url),
                               "prometheus_url": cfg.prometheus_url, "ephemeral": cfg.ephemeral}))
        return
    for name, state in states.items():
        click.echo(f"{name:11s} {state}")
    click.echo(f"bootstrap servers {cfg.bootstrap_servers}  redis {C.redact('redis_url', cfg.redis_url)}  "
               f"prometheus {cfg.prometheus_url}")
    if not cfg.redis_password and cfg.redis_url_file.exists():
        click.echo(f"services reach Redis with: export APMAE_REDIS_URL_FILE={cfg.redis_url_file.resolve()}")
    if cfg.ephemeral:
        click.echo("note: --ephemeral: the broker keeps topics in memory; they are lost when it stops.")


@infra.command("down")
@click.option("--only", default=None, help="Comma-separated subset: broker,redis,prometheus")
@config_options("services.infra:InfraConfig")
@JSON_OPTION
def infra_down(only: str | None, as_json: bool, **kw: Any) -> None:
    """Stop the servers (SIGTERM, then SIGKILL after a grace period)."""
    from services import infra as I

    states = I.down(_infra_cfg(kw), _components(only))
    if as_json:
        click.echo(json.dumps({"servers": states}))
        return
    for name, state in states.items():
        click.echo(f"{name:11s} {state}")


@infra.command("status")
@JSON_OPTION
@config_options("services.infra:InfraConfig")
def infra_status(as_json: bool, **kw: Any) -> None:
    """Report each server: pid, port, health, storage; exit status 1 when one is down."""
    from services import infra as I

    rows = I.status(_infra_cfg(kw))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        for r in rows:
            extra = f"  storage: {r['storage']}  generation: {r['generation']}" if "storage" in r else ""
            click.echo(f"{r['name']:11s} port {r['port']:<6} pid {r['pid'] or '-':<8} "
                       f"{'healthy' if r['healthy'] else 'DOWN'}{extra}")
    if not all(r["healthy"] for r in rows):  # scripts and health checks read the exit status
        raise SystemExit(1)


# -- topics / replay ---------------------------------------------------------------------------
@main.command("topics")
@config_options(C.BusConfig)
@JSON_OPTION
def topics_cmd(as_json: bool, **kw: Any) -> None:
    """Create every declared topic that is missing, and list them with their contract."""
    from apmae.topics import ALL_TOPICS
    from services.bus import Bus

    bus = Bus(build(C.BusConfig, kw), "topics")
    created = set(bus.ensure_topics())
    if as_json:
        click.echo(json.dumps([{"topic": bus.name(t), "partitions": t.partitions, "key": t.key,
                                "schema": t.record.SCHEMA, "version": t.record.VERSION, "minor": t.record.MINOR,
                                "created": bus.name(t) in created} for t in ALL_TOPICS]))
        return
    for t in ALL_TOPICS:
        mark = "created" if bus.name(t) in created else "exists"
        click.echo(f"{bus.name(t):18s} {t.partitions:2d}p key={t.key:18s} {t.record.SCHEMA}/v{t.record.VERSION:<3} {mark}")


@main.command("replay")
@config_options("services.replay:ReplayConfig")
def replay_cmd(**kw: Any) -> None:
    """Re-read a topic from an offset or a time range into a topic and/or Parquet files."""
    from services.replay import ReplayConfig, replay

    counts = replay(build(ReplayConfig, kw))
    click.echo(json.dumps(counts))


@main.command("export")
@click.argument("out_dir", type=click.Path(path_type=Path))
@config_options("services.replay:ReplayConfig")
def export_cmd(out_dir: Path, **kw: Any) -> None:
    """Export a topic (or a range of it) to Parquet files in OUT_DIR."""
    from services.replay import ReplayConfig, replay

    kw["to_parquet"] = str(out_dir)
    click.echo(json.dumps(replay(build(ReplayConfig, kw))))


@main.command("import")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--to-topic", default=None, help="Physical topic to write to (default: each row's topic)")
@config_options(C.BusConfig)
def import_cmd(path: Path, to_topic: str | None, **kw: Any) -> None:
    """Produce the messages of exported Parquet file(s) back into topics."""
    from services.replay import import_parquet

    click.echo(json.dumps(import_parquet(build(C.BusConfig, kw), path, to_topic)))


@main.command("ingest")
@config_options("services.ingest:IngestConfig")
def ingest_cmd(**kw: Any) -> None:
    """Publish a corpus's files to the files topic, de-duplicated by content hash (Redis)."""
    import signal

    from services.ingest import Ingest, IngestConfig

    cfg = build(IngestConfig, kw)
    start_service(cfg, "ingest")
    job = Ingest(cfg)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: job.stop.set())
    click.echo(json.dumps(job.run()))


@main.command("produce")
@loop_options
@config_options("services.producer:ProducerConfig")
def produce_cmd(limits: RunLimits, **kw: Any) -> None:
    """Mine tasks from files, run the target LLM, publish samples and attention patterns."""
    from services.producer import Producer, ProducerConfig

    cfg = build(ProducerConfig, kw)
    prod = Producer(cfg)
    run_loop(prod.processor_for(), "producer", cfg, limits)


@main.command("train", context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                        "help_option_names": []})
@click.pass_context
def train_cmd(ctx: click.Context) -> None:
    """Train AP-MAE from patterns.train (resumable; DDP under torchrun). See --help."""
    from services.trainer import main as trainer_main

    trainer_main(ctx.args)


@main.command("eval")
@click.option("--checkpoint", "checkpoints", multiple=True, required=True, type=click.Path(exists=True, path_type=Path),
              help="AP-MAE checkpoint directory (repeat for a cross-evaluation table)")
@click.option("--source", default="topic:patterns.mine", show_default=True,
              help="topic:<name> or parquet:<dir or file>")
@click.option("--limit", type=int, default=200, show_default=True,
              help="Samples to evaluate per target model (0 = all); n in the table counts samples")
@click.option("--heads-per-sample", type=int, default=5, show_default=True,
              help="Patterns (heads) per sample, a hash-based draw (0 = every head)")
@click.option("--figure", type=click.Path(path_type=Path), default=None, help="Write the paper's Figure 1 here")
@click.option("--json-out", type=click.Path(path_type=Path), default=None, help="Write the matrix as JSON")
@config_options(C.BusConfig)
def eval_cmd(checkpoints, source, limit, heads_per_sample, figure, json_out, **kw: Any) -> None:
    """Reconstruction loss (mean +- std) of checkpoints x target models (paper Table 2)."""
    from services import evaluate

    matrix = evaluate.run(build(C.BusConfig, kw, needs_broker=not source.startswith("parquet:")), list(checkpoints),
                          source, limit, figure, per_sample=heads_per_sample)
    if json_out:
        Path(json_out).write_text(evaluate.dump(matrix))


@main.command("encode")
@loop_options
@config_options("services.encoder:EncoderConfig")
def encode_cmd(limits: RunLimits, **kw: Any) -> None:
    """Embed mining patterns with the current AP-MAE checkpoint (hot-swapped from the registry)."""
    from services.encoder import Encoder, EncoderConfig

    cfg = build(EncoderConfig, kw)
    run_loop(Encoder(cfg).processor(), "encoder", cfg, limits)


@main.group()
def cluster() -> None:
    """Per-head UMAP + HDBSCAN: plan jobs, run fit workers."""


@cluster.command("plan")
@config_options("services.cluster:ClusterServiceConfig")
def cluster_plan_cmd(**kw: Any) -> None:
    """Snapshot a window of embeddings per head and enqueue one fit job per head."""
    from services.cluster import ClusterServiceConfig, plan

    click.echo(json.dumps(plan(build(ClusterServiceConfig, kw))))


@cluster.command("worker")
@loop_options
@config_options("services.cluster:ClusterServiceConfig")
def cluster_worker_cmd(limits: RunLimits, **kw: Any) -> None:
    """Fit heads from the job queue (--processes N: one per core; start more on other machines)."""
    from services.cluster import ClusterServiceConfig, run_workers
    from services.runtime import restart_process

    cfg = build(ClusterServiceConfig, kw)
    start_service(cfg, "cluster-fit")
    jobs = run_workers(cfg, limits, service="cluster-fit",
                       on_broken=lambda registered: restart_process(registered, "cluster-fit"))
    click.echo(json.dumps({"jobs": jobs}))


@cluster.command("fit")
@config_options("services.cluster:ClusterServiceConfig")
def cluster_fit_cmd(**kw: Any) -> None:
    """plan + workers until the queue is drained: the whole batch fit in one command."""
    from services.bus import RunLimits
    from services.cluster import ClusterServiceConfig, plan, run_workers

    cfg = build(ClusterServiceConfig, kw)
    p = plan(cfg)
    click.echo(json.dumps(p))
    click.echo(json.dumps({"jobs": run_workers(cfg, RunLimits(idle_timeout_s=20))}))


@main.command("assign")
@loop_options
@config_options("services.cluster:ClusterServiceConfig")
def assign_cmd(limits: RunLimits, **kw: Any) -> None:
    """Assign new embeddings to their head's fitted clusters; track drift; trigger refits."""
    from services.cluster import Assigner, ClusterServiceConfig

    cfg = build(ClusterServiceConfig, kw)
    run_loop(Assigner(cfg).processor(), "assign", cfg, limits)


@main.group("classify")
def classify() -> None:
    """Per-task CatBoost on per-head cluster ids: fit (CV, SHAP, figures) and live scoring."""


@classify.command("fit")
@config_options("services.classifier:ClassifyConfig")
@JSON_OPTION
def classify_fit_cmd(as_json: bool, **kw: Any) -> None:
    """Join samples with assignments, 10-fold CV per task vs baseline, SHAP per head, figures."""
    from services.classifier import ClassifyConfig, fit_all

    report = fit_all(build(ClassifyConfig, kw))
    if as_json:
        click.echo(json.dumps(report, default=str))
        return
    for model, m in report["models"].items():
        click.echo(f"{model}: {m['rows']} complete rows x {m['heads']} heads (clusters {report['cluster_version']})")
        for t in m["tasks"]:
            if "mean" in t:
                lo, hi = t["ci95"]
                click.echo(f"  {t['task']:20s} acc {t['mean']:.3f} [{lo:.3f}, {hi:.3f}]  chance "
                           f"{t['chance_level']:.2f}  (n={t['n']}, LLM correct {t['llm_correct_rate']:.2f})")
            else:
                click.echo(f"  {t['task']:20s} skipped: {t['skipped']}")


@classify.command("serve")
@loop_options
@config_options("services.classifier:ClassifyConfig")
def classify_serve_cmd(limits: RunLimits, **kw: Any) -> None:
    """Score complete rows live; publish P(correct); export accuracy and calibration metrics."""
    from services.classifier import ClassifyConfig, Scorer

    cfg = build(ClassifyConfig, kw)
    run_loop(Scorer(cfg).processor(), "classifier", cfg, limits)


@main.command("intervene")
@config_options("services.intervene:InterveneConfig")
@JSON_OPTION
def intervene_cmd(as_json: bool, **kw: Any) -> None:
    """Zero the top-SHAP / random / neutral heads of the target model; correctness change per task."""
    from services.intervene import InterveneConfig, run

    result = run(build(InterveneConfig, kw))
    if as_json:
        click.echo(json.dumps(result, default=str))
        return
    click.echo(f"{result['model']}: correctness change with {result['k']} heads zeroed (held-out inputs)")
    for s in result["summary"]:
        click.echo(f"  {s['task']:20s} n={s['n']:4d} correct {s['correct_rate']:.3f}  top {s['top']:+.3f}  "
                   f"random {s['random_mean']:+.3f} +- {s['random_std']:.3f}  neutral {s['neutral']:+.3f}")
    click.echo(f"wrote {result['figure']}")


@main.command("demo")
@config_options("services.demo:DemoConfig")
@JSON_OPTION
def demo_cmd(as_json: bool, **kw: Any) -> None:
    """The whole pipeline on the embedded default, with an HTML report (resumable)."""
    from services.demo import Demo, DemoConfig, summary

    logging.getLogger("apmae").setLevel(logging.WARNING)
    done = Demo(build(DemoConfig, kw)).run()
    click.echo(json.dumps(done, default=str) if as_json else summary(done))


@main.command("study")
@config_options("services.study:StudyConfig")
@JSON_OPTION
def study_cmd(as_json: bool, **kw: Any) -> None:
    """The pipeline at statistical scale within --budget-minutes: docs/study/numbers.json and README.md
    (resumable; issue #15)."""
    from services.study import Study, StudyConfig, launch_note

    logging.getLogger("apmae").setLevel(logging.WARNING)
    study = Study(build(StudyConfig, kw))
    done = study.run()
    click.echo(json.dumps(done, default=str) if as_json else launch_note(done, study.cfg))


if __name__ == "__main__":
    main()
