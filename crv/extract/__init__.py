"""Dataset extraction: each trace's step rows and pruned graphs, stored resumably, computed locally or on Ray;
fingerprint archives keep the graphs' part of a table where the graphs are not kept."""

from crv.extract.archive import FingerprintArchive
from crv.extract.executors import Executor, ExtractSpec, LocalExecutor, RayExecutor
from crv.extract.run import archive_fingerprints, build_step_table, trace_keys
from crv.extract.store import Entry, TraceStore, trace_key

__all__ = ["Entry", "Executor", "ExtractSpec", "FingerprintArchive", "LocalExecutor", "RayExecutor", "TraceStore", "archive_fingerprints",
           "build_step_table", "trace_key", "trace_keys"]
