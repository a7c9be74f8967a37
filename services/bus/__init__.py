"""The bus: apmae records over Kafka (kafka-python), in four rooms and a test hook.

* :mod:`services.bus.client`     - :class:`Bus`: topic names, producer, consumers, dead letters
* :mod:`services.bus.processing` - :class:`Processor`: the at-least-once processing loop
* :mod:`services.bus.done`       - :class:`DoneStore`: marks of inputs whose outputs are durable
* :mod:`services.bus.offsets`    - end offsets, ranged reads, and the consumer-lag probe
* :mod:`services.bus.failpoints` - where fault tests make the loop fail on purpose
* :mod:`services.bus.kafka_fixes` - measured fixes to kafka-python's network path, installed here

Services import the public names from here.
"""

from services.bus import kafka_fixes
from services.bus.client import (
    TRANSIENT,
    Bus,
    DeadLetter,
    Message,
    Output,
    Retryable,
    kafka_security,
    native_crc32c,
)
from services.bus.done import DoneStore
from services.bus.offsets import LagProbe, read_range, topic_end_offsets, true_end_offsets
from services.bus.processing import ConsumerStalled, Handler, Processor, RunLimits

kafka_fixes.install()

__all__ = [
    "TRANSIENT", "Bus", "ConsumerStalled", "DeadLetter", "DoneStore", "Handler", "LagProbe", "Message", "Output", "Processor",
    "Retryable", "RunLimits", "kafka_security", "native_crc32c", "read_range", "topic_end_offsets", "true_end_offsets",
]
