"""Where per-trace extraction runs: in this process, or on a Ray cluster.

An executor takes the traces still to compute and calls ``on_result(index, entry)`` in the
driver as each finishes; the driver alone writes the store, so results are never written twice.

- :class:`LocalExecutor`: in-process, one trace after another, with a progress bar.
- :class:`RayExecutor`: one Ray actor per worker loads the model and transcoders once (from
  the directories the driver's attributor was loaded from) and processes traces in batches;
  actors ask for a GPU when CUDA is available. Ray is optional: ``pip install crv[ray]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from tqdm.auto import tqdm

from crv.attribution.attributor import Attributor
from crv.extract.steps import trace_entry
from crv.extract.store import Entry
from crv.tasks.schema import Record


@dataclass(frozen=True)
class ExtractSpec:
    """What to extract per trace: the step target of the fingerprint and extra targets."""

    target: str = "last"
    extra_targets: tuple[str, ...] = ()


class InjectedFailure(RuntimeError):
    """Raised by a worker on purpose (``fail_after``): how tests simulate a run killed midway."""


def compute_entry(att: Attributor, record: Record, spec: ExtractSpec, fingerprints: list[dict] | None = None) -> Entry:
    """The store entry of one trace (with archived ``fingerprints``: no graphs, see :mod:`crv.extract.archive`)."""
    import pandas as pd

    rows, summaries = trace_entry(att, record, spec.target, spec.extra_targets, fingerprints)
    return Entry(pd.DataFrame(rows), summaries)


OnResult = Callable[[int, Entry], None]


class Executor(Protocol):
    """Where traces are computed: ``run`` calls ``on_result(index, entry)`` in the driver for each of ``indices``."""

    def run(self, att: Attributor, spec: ExtractSpec, records: Sequence[Record], indices: Sequence[int],
            on_result: OnResult) -> None: ...


class LocalExecutor:
    """Runs every trace in this process."""

    def __init__(self, progress: bool = True, fail_after: int | None = None) -> None:
        self.progress, self.fail_after = progress, fail_after

    def run(self, att: Attributor, spec: ExtractSpec, records: Sequence[Record], indices: Sequence[int],
            on_result: OnResult) -> None:
        for done, i in enumerate(tqdm(indices, desc="graphs", unit="trace", disable=not self.progress)):
            if self.fail_after is not None and done >= self.fail_after:
                raise InjectedFailure(f"failing on purpose after {done} traces")
            on_result(i, compute_entry(att, records[i], spec))


class _Worker:
    """A Ray actor's state: the attributor, loaded once."""

    def __init__(self, spec: dict, threads: int, fail_after: int | None) -> None:
        import torch

        from crv.attribution.attributor import AttributorSpec

        torch.set_num_threads(threads)
        self.att = Attributor.from_spec(AttributorSpec.from_dict(spec))  # the driver's model, set, settings, device
        self.fail_after, self.done = fail_after, 0

    def run(self, spec: ExtractSpec, batch: list[tuple[int, Record]]) -> list[tuple[int, Entry]]:
        out = []
        for i, rec in batch:
            if self.fail_after is not None and self.done >= self.fail_after:
                raise InjectedFailure(f"worker failing on purpose after {self.done} traces")
            out.append((i, compute_entry(self.att, rec, spec)))
            self.done += 1
        return out


class RayExecutor:
    """Runs traces on Ray actors (``address``: ``None`` starts a local cluster, ``"auto"`` or ``ray://...`` joins one)."""

    def __init__(self, num_workers: int = 2, address: str | None = None, batch_size: int = 4, threads_per_worker: int = 1,
                 progress: bool = True, fail_after: int | None = None) -> None:
        if num_workers < 1 or batch_size < 1:
            raise ValueError("num_workers and batch_size must be at least 1")
        self.num_workers, self.address, self.batch_size = num_workers, address, batch_size
        self.threads, self.progress, self.fail_after = threads_per_worker, progress, fail_after

    def run(self, att: Attributor, spec: ExtractSpec, records: Sequence[Record], indices: Sequence[int],
            on_result: OnResult) -> None:
        try:
            import ray
        except ImportError as e:  # pragma: no cover - depends on the install
            raise RuntimeError("the Ray executor needs Ray: pip install 'crv[ray]'") from e
        if att.model_dir is None or att.transcoder_dir is None:
            raise ValueError("the Ray executor needs an attributor made by Attributor.load (its workers load the same directories)")
        if not ray.is_initialized():
            ray.init(address=self.address, num_cpus=None if self.address else self.num_workers * self.threads,
                     include_dashboard=False, log_to_driver=False, configure_logging=False)
        att_spec = att.spec
        gpu = att_spec.device.startswith("cuda")  # workers use the device the driver was given (--device), never another
        Worker = ray.remote(num_cpus=self.threads, num_gpus=1 if gpu else 0)(_Worker)
        actors = [Worker.remote(att_spec.to_dict(), self.threads, self.fail_after) for _ in range(self.num_workers)]
        batches = [[(i, records[i]) for i in indices[s : s + self.batch_size]] for s in range(0, len(indices), self.batch_size)]
        bar = tqdm(total=len(indices), desc="graphs (ray)", unit="trace", disable=not self.progress)
        pending: dict = {}
        free = list(actors)
        try:
            while batches or pending:
                while batches and free:
                    actor = free.pop()
                    pending[actor.run.remote(spec, batches.pop(0))] = actor
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    free.append(pending.pop(ref))
                    for i, entry in ray.get(ref):  # re-raises a worker's exception here
                        on_result(i, entry)
                        bar.update(1)
        finally:
            bar.close()
            for a in actors:
                ray.kill(a)
