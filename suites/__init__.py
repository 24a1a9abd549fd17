"""Suites: one module per suite family, each registered with ``bench.registry.register_suite``."""
