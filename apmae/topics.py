"""Topics, keys and record schemas: the contract between services, declared once.

Every record is a frozen dataclass (see :mod:`apmae.messages` for the envelope and its
byte order). Adding an optional field (with a default) bumps the record's ``MINOR``: older
readers ignore it, newer readers fill it in for older messages. A change old readers would
misread bumps ``VERSION``; readers reject majors they do not know, and the message goes to
the dead-letter topic with the reason instead of being misread.

================  ========================  =====================================  =========
topic             key                       value                                  retention
================  ========================  =====================================  =========
files             file id (content hash)    FileRecord                             replayable
samples           sample id                 SampleRecord (one per LLM prediction)  replayable
patterns.train    "model/layer/head"        PatternRecord (25% heads, correct)     replayable
patterns.mine     "model/layer/head"        PatternRecord (all heads, balanced)    replayable
embeddings        "model/layer/head"        EmbeddingRecord (CLS, 512-d)           replayable
assignments       "model/layer/head"        AssignmentRecord (cluster id per head) replayable
scores            sample id                 ScoreRecord (P(LLM correct))           replayable
checkpoints       model name                CheckpointRecord (registry announces)  compacted
cluster.jobs      "model/layer/head"        FitJobRecord (one per head to fit)     work queue
deadletter        source topic              DeadLetterRecord + original bytes      replayable
================  ========================  =====================================  =========
"""

from __future__ import annotations

from dataclasses import dataclass

from apmae.messages import Record


@dataclass(frozen=True)
class FileRecord(Record):
    """One source file of a corpus. ``id`` = sha256 of the UTF-8 content (first 32 hex)."""

    SCHEMA = "file"
    source: str
    path: str
    content: str
    license: str | None = None
    repo: str | None = None


@dataclass(frozen=True)
class SampleRecord(Record):
    """One masked-completion prediction of the target model.

    ``correct`` is None for the noise task (no ground truth). ``exact_match`` is the optional
    whole-span greedy-generation check, None when not computed.
    """

    SCHEMA = "sample"
    file_id: str
    model: str
    task: str
    prompt_mode: str
    target: str
    target_token: int
    predicted_token: int
    predicted: str
    correct: bool | None
    n_layers: int
    n_heads: int
    exact_match: bool | None = None
    generated: str | None = None


@dataclass(frozen=True)
class PatternRecord(Record):
    """One head's attention pattern for one sample.

    payload: lower triangle of the ``(size, size)`` pattern, row-major, ``size (size+1)/2``
    values in ``dtype`` (see :mod:`apmae.codec`).
    """

    SCHEMA = "pattern"
    sample_id: str
    model: str
    task: str
    layer: int
    head: int
    correct: bool | None
    size: int
    dtype: str = "bfloat16"
    payload: bytes = b""

    @property
    def key(self) -> str:
        return head_key(self.model, self.layer, self.head)


@dataclass(frozen=True)
class EmbeddingRecord(Record):
    """AP-MAE CLS embedding of one pattern. payload: ``(dim,)`` little-endian float32."""

    SCHEMA = "embedding"
    sample_id: str
    model: str
    task: str
    layer: int
    head: int
    correct: bool | None
    checkpoint: str
    dim: int
    payload: bytes = b""


@dataclass(frozen=True)
class AssignmentRecord(Record):
    """The cluster one head's pattern falls in (-1 = noise) and its membership strength."""

    SCHEMA = "assignment"
    sample_id: str
    model: str
    task: str
    layer: int
    head: int
    correct: bool | None
    cluster: int
    strength: float
    cluster_version: str
    checkpoint: str = ""  # the AP-MAE checkpoint that made the embedding (one embedding space per version)


@dataclass(frozen=True)
class ScoreRecord(Record):
    """The classifier's probability that the target model's prediction is correct."""

    SCHEMA = "score"
    sample_id: str
    model: str
    task: str
    prob_correct: float
    actual: bool | None
    classifier_version: str
    cluster_version: str = ""  # the cluster version the classifier was fit on (and the row's assignments are of)
    in_sample: bool | None = None  # True: the classifier was fit on this very sample (not an accuracy)


@dataclass(frozen=True)
class CheckpointRecord(Record):
    """A new AP-MAE checkpoint in the model registry (path relative to the artifact store)."""

    SCHEMA = "checkpoint"
    name: str
    path: str
    step: int
    sha256: str
    loss: float | None = None


@dataclass(frozen=True)
class FitJobRecord(Record):
    """One per-head clustering job (UMAP + HDBSCAN) for the fit workers."""

    SCHEMA = "fitjob"
    model: str
    layer: int
    head: int
    source: str
    version: str
    checkpoint: str = ""  # fit only embeddings made by this AP-MAE checkpoint


@dataclass(frozen=True)
class DeadLetterRecord(Record):
    """A message a service could not decode or process. payload: the original value bytes."""

    SCHEMA = "deadletter"
    source_topic: str
    partition: int
    offset: int
    service: str
    reason: str
    payload: bytes = b""


@dataclass(frozen=True)
class Topic:
    name: str
    record: type[Record]
    key: str
    partitions: int
    doc: str
    compacted: bool = False
    # Producer compression when the bus runs with compression "auto" (the default): chosen
    # per topic from measurement (README, Throughput): text and small JSON records compress
    # several-fold with zstd; float32 embeddings do not compress at all.
    codec: str = "zstd"


def head_key(model: str, layer: int, head: int) -> str:
    return f"{model}/{layer}/{head}"


FILES = Topic("files", FileRecord, "file id", 4, "source files from ingest")
SAMPLES = Topic("samples", SampleRecord, "sample id", 4, "one record per LLM prediction")
PATTERNS_TRAIN = Topic("patterns.train", PatternRecord, "model/layer/head", 8, "AP-MAE training patterns")
PATTERNS_MINE = Topic("patterns.mine", PatternRecord, "model/layer/head", 8, "all-head mining patterns")
EMBEDDINGS = Topic("embeddings", EmbeddingRecord, "model/layer/head", 8, "CLS embeddings", codec="none")
ASSIGNMENTS = Topic("assignments", AssignmentRecord, "model/layer/head", 8, "cluster ids per head")
SCORES = Topic("scores", ScoreRecord, "sample id", 4, "live correctness scores")
CHECKPOINTS = Topic("checkpoints", CheckpointRecord, "model name", 1, "model registry announcements", True)
FIT_JOBS = Topic("cluster.jobs", FitJobRecord, "model/layer/head", 4, "per-head fit work queue")
DEADLETTER = Topic("deadletter", DeadLetterRecord, "source topic", 1, "messages that failed")

ALL_TOPICS: tuple[Topic, ...] = (
    FILES, SAMPLES, PATTERNS_TRAIN, PATTERNS_MINE, EMBEDDINGS, ASSIGNMENTS, SCORES, CHECKPOINTS,
    FIT_JOBS, DEADLETTER,
)
BY_NAME = {t.name: t for t in ALL_TOPICS}


DAY_MS = 24 * 3600 * 1000
# retention per topic (ms, -1 = kept): replayable topics are kept until an operator deletes
# them (experiments replay from offset 0); the fit work queue is done once the registry holds
# the head's model.
RETENTION_MS: dict[str, int] = {FIT_JOBS.name: 7 * DAY_MS}


def topic_configs(t: Topic, max_message_bytes: int | None = None) -> dict[str, str]:
    """Kafka topic-level configs for ``t`` (pass as ``NewTopic(..., topic_configs=...)``):
    cleanup policy (``compact`` where the topic is declared compacted: the latest record per
    key is what readers need), retention, and optionally the largest record it accepts."""
    cfg = {"cleanup.policy": "compact" if t.compacted else "delete",
           "retention.ms": str(-1 if t.compacted else RETENTION_MS.get(t.name, -1)),
           "retention.bytes": "-1"}
    if t.compacted:  # a superseded registry announcement may go at the next cleaning
        cfg["min.compaction.lag.ms"] = "0"
    if max_message_bytes:
        cfg["max.message.bytes"] = str(max_message_bytes)
    return cfg


def topic(name: str) -> Topic:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown topic {name!r}; known: {sorted(BY_NAME)}") from None
