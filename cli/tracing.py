"""``--traces``: switching OpenTelemetry traces on for ``venna serve`` or ``venna http``.

``otlp`` exports over OTLP/HTTP (protobuf), configured by OpenTelemetry's own environment
variables (OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, their headers and
timeouts; OTEL_TRACES_SAMPLER); ``console`` writes each span to stderr, for a look without a
collector. Spans leave in batches from a thread of the SDK, off the event loop; ``stop`` flushes
what is left, after the server has drained.

The SDK is an optional extra: it is imported only here, only when asked for.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from venna.backends import tracing as service_tracing
from venna.gateway_http import tracing as shim_tracing

MODES = ("off", "otlp", "console")
DEFAULT_SERVICE_NAME = "venna"


class TracingUnavailable(Exception):
    """Traces were asked for, and the ``otel`` extra is not installed."""


def start(mode: str, *, shim: bool) -> Callable[[], None]:
    """Switches traces on in this process as ``mode`` says: the service's spans, or with
    ``shim`` the HTTP shim's (``venna http``). Returns what flushes and stops them."""
    if mode == "off":
        return lambda: None
    try:
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

        exporter: SpanExporter
        if mode == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        else:
            exporter = ConsoleSpanExporter(out=sys.stderr)
    except ImportError as error:
        raise TracingUnavailable(
            f"--traces {mode} needs OpenTelemetry, which is not installed ({error.name or error});"
            " install the extra: pip install 'venna[otel]'"
        ) from None
    # OTEL_SERVICE_NAME (or service.name in OTEL_RESOURCE_ATTRIBUTES) when set, else "venna".
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    # Flushed by ``stop``, not by the SDK's own exit hook.
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    layer = shim_tracing if shim else service_tracing
    layer.enable(provider)

    def stop() -> None:
        layer.disable()
        provider.force_flush()
        provider.shutdown()

    return stop
