"""Dataset extraction: each trace's step rows and pruned graphs, stored resumably, computed locally or on Ray."""

from crv.extract.executors import ExtractSpec, LocalExecutor, RayExecutor
from crv.extract.run import build_step_table
from crv.extract.store import Entry, TraceStore, trace_key

__all__ = ["Entry", "ExtractSpec", "LocalExecutor", "RayExecutor", "TraceStore", "build_step_table", "trace_key"]
