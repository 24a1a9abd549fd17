"""Merging methods: one module per method, each registered with ``bench.registry.register_method``."""
