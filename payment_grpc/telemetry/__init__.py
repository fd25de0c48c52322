"""OpenTelemetry for the service: traces (tracing.py), metrics (metrics.py).

The OTel API is used through its process-wide providers, the way instrumentation
libraries use it: until `serve` installs an SDK provider every span and instrument is a
no-op, so tests that build applications in-process pay nothing and export nothing.
"""
