"""Measurements: analytic FLOPs and KV memory, step latency of interleaved methods, and the
statistics that compare methods on paired episodes."""
