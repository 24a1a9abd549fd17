"""merge-bench: run model-merging methods against suites, store the results, report them."""

__version__ = "0.1.0"
