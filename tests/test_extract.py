"""Dataset extraction: resumable store, interrupted runs, corrupted files, and Ray = local."""

import pandas as pd
import pytest

from crv.attribution.attributor import Attributor
from crv.attribution.engine import AttributionConfig
from crv.extract import LocalExecutor, RayExecutor, TraceStore, build_step_table
from crv.extract.executors import InjectedFailure
from crv.tasks.cot import generate_problems
from crv.tasks.label import label_output


@pytest.fixture(scope="module")
def att():
    return Attributor.load(config=AttributionConfig(max_feature_nodes=64))


@pytest.fixture(scope="module")
def records():
    out = []
    for i, p in enumerate(generate_problems("arith", 3, 6, seed=40)):
        text = p.completion
        if i % 3 == 2:  # a wrong result in the second step
            lines = text.split("\n")
            op, rest = lines[1].split("=", 1)
            result, state = rest.split(" => ", 1)
            lines[1] = f"{op}={int(result) + 1} => {state}"
            text = "\n".join(lines)
        out.append(label_output(p, text))
    return out


@pytest.fixture(scope="module")
def clean(att, records, tmp_path_factory):
    """The reference: one uninterrupted local run."""
    return build_step_table(att, records, tmp_path_factory.mktemp("clean"), progress=False)


def entry_files(root):
    return sorted(p.name for p in root.rglob("*") if p.is_file() and not p.name.startswith("manifest."))


@pytest.mark.slow
def test_store_round_trip_and_reuse(att, records, clean, tmp_path):
    table = build_step_table(att, records, tmp_path, progress=False)
    pd.testing.assert_frame_equal(table, clean)
    store = TraceStore(tmp_path)
    assert len(store.keys()) == len(records)
    assert not [p for p in tmp_path.rglob("*.tmp*")]
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file() and p.name != "manifest.json"}
    again = build_step_table(att, records, tmp_path, progress=False, executor=LocalExecutor(fail_after=0))
    pd.testing.assert_frame_equal(again, clean)  # nothing recomputed (the executor would have failed)
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
    runs = __import__("json").loads((tmp_path / "manifest.json").read_text())["runs"]
    assert [r["computed"] for r in runs] == [len(records), 0] and runs[0]["versions"]["torch"]
    # other settings -> other keys: nothing is reused by mistake
    other = Attributor.load(config=AttributionConfig(max_feature_nodes=32))
    with pytest.raises(InjectedFailure):
        build_step_table(other, records, tmp_path, progress=False, executor=LocalExecutor(fail_after=0))


@pytest.mark.slow
def test_interrupted_run_resumes_to_identical_outputs(att, records, clean, tmp_path):
    with pytest.raises(InjectedFailure):
        build_step_table(att, records, tmp_path, progress=False, executor=LocalExecutor(progress=False, fail_after=2))
    assert len(TraceStore(tmp_path).keys()) == 2
    table = build_step_table(att, records, tmp_path, progress=False)
    pd.testing.assert_frame_equal(table, clean)
    keys = TraceStore(tmp_path).keys()
    assert len(keys) == len(set(keys)) == len(records)  # no duplicates
    assert len(entry_files(tmp_path)) == 4 * len(records)  # rows, graphs (2 files), marker per trace


@pytest.mark.slow
def test_corrupted_entry_is_detected_and_recomputed(att, records, clean, tmp_path):
    build_step_table(att, records, tmp_path, progress=False)
    store = TraceStore(tmp_path)
    key = store.keys()[0]
    rows = next(tmp_path.rglob(f"{key}.parquet"))
    data = bytearray(rows.read_bytes())
    data[len(data) // 2] ^= 0xFF
    rows.write_bytes(bytes(data))
    assert not store.has(key) and store.get(key) is None
    graphs = next(tmp_path.rglob(f"{store.keys()[1]}.graphs.safetensors"))
    graphs.write_bytes(graphs.read_bytes()[:-10])  # truncated
    assert not store.has(store.keys()[1])
    table = build_step_table(att, records, tmp_path, progress=False)
    pd.testing.assert_frame_equal(table, clean)
    assert store.has(key) and store.has(store.keys()[1])
    assert TraceStore(tmp_path).get(key).summaries["last"][0].n_nodes > 0


@pytest.mark.slow
def test_ray_executor_matches_local_and_resumes(att, records, clean, tmp_path):
    import ray  # make test installs the ray extra
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        with pytest.raises(Exception, match="failing on purpose"):
            build_step_table(att, records, tmp_path, progress=False,
                             executor=RayExecutor(num_workers=2, batch_size=1, progress=False, fail_after=1))
        assert 0 < len(TraceStore(tmp_path).keys()) < len(records)
        table = build_step_table(att, records, tmp_path, progress=False,
                                 executor=RayExecutor(num_workers=2, batch_size=2, progress=False))
    finally:
        ray.shutdown()
    pd.testing.assert_frame_equal(table, clean, check_exact=False, rtol=1e-5, atol=1e-7)
    assert len(TraceStore(tmp_path).keys()) == len(records)
    assert not [p for p in tmp_path.rglob("*.tmp*")]


@pytest.mark.slow
def test_archive_rebuilds_the_table_without_graphs(att, records, tmp_path, monkeypatch):
    from crv.attribution.engine import TraceAttribution
    from crv.extract.steps import column_groups
    from crv.extract import FingerprintArchive, archive_fingerprints, trace_keys

    extra = ("uncertain",)
    store, path = tmp_path / "store", tmp_path / "data" / "fingerprints.parquet"
    # a partial build: two traces stored, archived; the archive holds just those
    with pytest.raises(InjectedFailure):
        build_step_table(att, records, store, progress=False, extra_targets=extra,
                         executor=LocalExecutor(progress=False, fail_after=2))
    assert archive_fingerprints(att, records, store, path, extra_targets=extra) == (2, len(records))
    reference = build_step_table(att, records, store, progress=False, extra_targets=extra)
    assert archive_fingerprints(att, records, store, path, extra_targets=extra) == (len(records), len(records))
    archive = FingerprintArchive(path)
    keys = trace_keys(att, records, extra_targets=extra)
    assert sorted(archive.keys()) == sorted(keys)
    groups = column_groups(reference)
    assert archive.columns == groups["fingerprint"] + groups["fingerprint:uncertain"]  # fingerprints only, both targets

    # a fresh store, from the archive: the same table, and not one graph computed
    def no_graphs(*a, **k):
        raise AssertionError("a graph was computed for an archived trace")

    monkeypatch.setattr(TraceAttribution, "graph", no_graphs)
    table = build_step_table(att, records, tmp_path / "fresh", progress=False, extra_targets=extra, archive=path,
                             executor=LocalExecutor(fail_after=0))
    pd.testing.assert_frame_equal(table, reference)
    assert TraceStore(tmp_path / "fresh").get(keys[0]).summaries == {}  # stored, without graphs
    monkeypatch.undo()

    # other settings (other step targets): the archive does not match, those traces are computed, never mixed in
    with pytest.raises(InjectedFailure):
        build_step_table(att, records, tmp_path / "other", progress=False, archive=path, executor=LocalExecutor(fail_after=0))
    # half an archive: the rest is computed, the table is the same
    half = FingerprintArchive(tmp_path / "half.parquet")
    assert half.add({k: TraceStore(store).get(k).rows for k in keys[::2]}) == len(keys[::2])
    mixed = build_step_table(att, records, tmp_path / "mixed", progress=False, extra_targets=extra, archive=half)
    pd.testing.assert_frame_equal(mixed, reference)


def test_archive_refuses_mixed_settings_and_damaged_files(att, records, clean, tmp_path):
    from crv.extract import FingerprintArchive

    path = tmp_path / "a.parquet"
    archive = FingerprintArchive(path)
    first = clean[clean["problem_id"] == records[0].problem_id]
    archive.add({"k0": first})
    with pytest.raises(ValueError, match="one archive per extraction setting"):
        archive.add({"k1": first.drop(columns=["density"])})
    with pytest.raises(ValueError, match="damaged"):
        FingerprintArchive(path).get("k0", len(records[0].steps) + 1)
    pd.DataFrame({"x": [1]}).to_parquet(tmp_path / "b.parquet")
    with pytest.raises(ValueError, match="not a fingerprint archive"):
        FingerprintArchive(tmp_path / "b.parquet")
