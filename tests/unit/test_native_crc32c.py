"""kafka-python checksums every record batch; in pure Python that bounds the whole bus at
~6.5 MB/s. The project's environment must give it the C extension."""

import logging

from prometheus_client import REGISTRY

from services import metrics
from services.bus import native_crc32c


def test_the_environment_gives_kafka_python_the_native_crc32c():
    assert native_crc32c(), "kafka-python would checksum in pure Python: install crc32c (pyproject pins it)"


def test_services_export_the_checksum_mode_and_warn_once_where_it_is_pure_python(caplog):
    with caplog.at_level(logging.WARNING, logger="apmae.metrics"):
        metrics.check_native_crc32c("svc", False)
    assert REGISTRY.get_sample_value("apmae_kafka_native_crc32c") == 0
    assert [r for r in caplog.records if "crc32c" in r.getMessage() and "pure Python" in r.getMessage()]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="apmae.metrics"):
        metrics.check_native_crc32c("svc", True)
    assert REGISTRY.get_sample_value("apmae_kafka_native_crc32c") == 1
    assert not caplog.records
