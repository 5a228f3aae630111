"""The step-verification service: answers, limits, auth, the queue, fuzzing, the client and the CLI."""

import json
import sys
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from crv.api.app import ServiceSettings, check_bind, create_app
from crv.attribution.attributor import step_position
from crv.cli import app as cli
from crv.fingerprint.features import fingerprint

# a reasoner mistake (42-2 is 40; written by an earlier shipped reasoner): the tests check answers, not the verdict
FAULTY = {"task": "arith", "question": "(6*(3+4))-2", "steps": ["3+4=7 => (6*7)-2", "6*7=42 => 42-2", "42-2=30 => 30"]}
# the shipped reasoner's own mistake (11*47 is 517), flagged by the shipped verifier; the viewer's first example
FLAGGED = {"task": "arith", "question": "4+((5+6)*(2+(9*5)))",
           "steps": ["5+6=11 => 4+(11*(2+(9*5)))", "9*5=45 => 4+(11*(2+45))", "2+45=47 => 4+(11*47)", "11*47=587 => 4+587"]}


def test_verify_answers_per_step(verifier):
    client = TestClient(create_app(verifier))
    r = client.post("/v1/verify", json={**FAULTY, "include_graph": True})
    assert r.status_code == 200, r.text
    body = r.json()
    steps = body["steps"]
    assert [s["index"] for s in steps] == [0, 1, 2] and [s["text"] for s in steps] == FAULTY["steps"]
    for s in steps:
        assert 0.0 <= s["p_faulty"] <= 1.0 and s["flagged"] == (s["p_faulty"] >= s["threshold"])
        assert set(s["fingerprint"]) == set(verifier.classifier.feature_names)
        infl = [f["influence"] for f in s["top_features"]]
        assert infl == sorted(infl, reverse=True) and len(infl) == 10
        g = s["graph"]
        assert all(0 <= e["source"] < len(g["nodes"]) and 0 <= e["target"] < len(g["nodes"]) for e in g["edges"])
        assert {n["kind"] for n in g["nodes"]} >= {"token", "logit", "feature"}
    # the same fingerprint as the offline pipeline computes for that step
    enc = verifier.att.encoder.encode("arith", FAULTY["question"], FAULTY["steps"])
    tr = verifier.att.trace(enc.ids)
    offline = fingerprint(tr.graph(pos=step_position(enc, 2, "last")))
    assert steps[2]["fingerprint"] == pytest.approx(offline, rel=1e-6, abs=1e-9)
    # free text gives the same verdicts as the list of steps
    r2 = client.post("/v1/verify", json={"task": "arith", "question": FAULTY["question"],
                                         "text": "\n".join(FAULTY["steps"]) + "\nA: 30\n"})
    assert [s["p_faulty"] for s in r2.json()["steps"]] == pytest.approx([s["p_faulty"] for s in steps])
    info = client.get("/v1/model").json()
    assert info["model"] == verifier.att.model_id and info["transcoders"] and info["classifier"]
    assert client.get("/healthz").json()["status"] == "ok"
    assert client.get("/openapi.json").status_code == 200 and client.get("/docs").status_code == 200


@pytest.mark.parametrize("body,status,words", [
    ({**FAULTY, "steps": ["1+1=2 => 2"] * 40}, 422, "at most 32 items"),
    ({**FAULTY, "question": "1+" * 3000 + "1"}, 413, "characters"),
    ({**FAULTY, "steps": ["3+4=7 € 7"]}, 422, "'€'"),
    ({**FAULTY, "question": "(3+4)×2"}, 422, "'×'"),
    ({**FAULTY, "text": "3+4=7 => 7"}, 422, "exactly one"),
    ({**FAULTY, "steps": []}, 422, "at least 1 item"),
    ({**FAULTY, "steps": ["   "]}, 422, "empty"),
    ({**FAULTY, "steps": ["3+4=7 \ud800 => 7"]}, 422, "unicode"),
    ({"task": "arith", "question": FAULTY["question"], "text": "3+4=7 => 7\udfff"}, 422, "unicode"),
    ({**FAULTY, "steps": None}, 422, "valid list"),  # absent means not given; an explicit null is refused
    ({**FAULTY, "steps": ["3+4=7\n => 7"]}, 422, "newline"),
    ({**FAULTY, "steps": "3+4=7 => 7"}, 422, "steps"),
    ({**FAULTY, "task": "chess"}, 422, "task"),
    ({**FAULTY, "extra": 1}, 422, "extra"),
    ({"task": "arith"}, 422, "question"),
])
def test_bad_requests_are_refused_with_the_reason(verifier, body, status, words):
    import json

    # as JSON text (ASCII escapes), so a lone surrogate travels as "\ud800", as a client would send it
    r = TestClient(create_app(verifier)).post("/v1/verify", content=json.dumps(body),
                                              headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]


@pytest.mark.parametrize("value", [1e308, 1e30, float("nan"), float("inf"), -float("inf")])
def test_non_finite_or_huge_edit_values_are_refused(verifier, value):
    import json

    body = json.dumps({**FAULTY, "step_index": 1, "features": [[0, 1]], "mode": "set", "value": value})  # NaN/Infinity as JSON allows
    r = TestClient(create_app(verifier)).post("/v1/intervene", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "value" in r.json()["detail"], r.text


def test_chunked_bodies_are_refused_at_the_limit_on_every_path(verifier):
    """No Content-Length (chunked): the body is counted as it streams and refused at the limit, on /v1/* and on
    paths that never read a body; with an API key set, before any key is checked."""
    client = TestClient(create_app(verifier, ServiceSettings(max_body_bytes=2_000, api_key="k")))
    chunks = lambda: (b"x" * 1024 for _ in range(100))  # noqa: E731
    r = client.post("/v1/verify", content=chunks(), headers={"Content-Type": "application/json", "X-API-Key": "k"})
    assert r.status_code == 413 and "2000 bytes" in r.json()["detail"], r.text
    r = client.post("/v1/intervene", content=chunks(), headers={"Content-Type": "application/json"})  # no key
    assert r.status_code == 401
    assert client.post("/nothing", content=chunks()).status_code == 404  # never read, never held


def test_a_streamed_body_never_grows_the_servers_memory(live_server):
    """Against the real server (in this process): a 200 MB chunked body offered to /v1/verify and to a path that
    reads no body is refused with 413 / 404 while resident memory stays flat (the body is never held)."""
    import httpx

    def rss_mb() -> float:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    def chunks():
        for _ in range(200):
            yield b"x" * (1 << 20)

    before = rss_mb()
    for path, want in (("/v1/verify", 413), ("/nothing", 404)):
        try:
            r = httpx.post(live_server.url + path, content=chunks(), headers={"Content-Type": "application/json"}, timeout=60)
            assert r.status_code == want, (path, r.status_code)
        except httpx.HTTPError:
            pass  # the server closed the connection while the client was still sending: also a refusal
    assert rss_mb() - before < 50, (before, rss_mb())


def test_malformed_and_huge_bodies(verifier):
    client = TestClient(create_app(verifier, ServiceSettings(max_body_bytes=2_000)))
    r = client.post("/v1/verify", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    r = client.post("/v1/verify", content=b"x" * 5_000, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "2000 bytes" in r.json()["detail"]
    r = client.post("/v1/verify", json=[1, 2, 3])
    assert r.status_code == 422


def test_auth(verifier):
    client = TestClient(create_app(verifier, ServiceSettings(api_key="s3cret")))
    assert client.post("/v1/verify", json=FAULTY).status_code == 401
    assert client.post("/v1/verify", json=FAULTY, headers={"X-API-Key": "wrong"}).status_code == 401
    assert client.get("/v1/model").status_code == 401
    assert client.get("/v1/model", headers={"X-API-Key": "s3cret"}).status_code == 200
    assert client.post("/v1/verify", json=FAULTY, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/healthz").status_code == 200
    check_bind("127.0.0.1", None)
    check_bind("::1", None)
    check_bind("0.0.0.0", "key")
    with pytest.raises(ValueError, match="CRV_API_KEY"):
        check_bind("0.0.0.0", None)
    r = CliRunner().invoke(cli, ["serve", "--host", "0.0.0.0"], env={"CRV_API_KEY": ""})
    assert r.exit_code != 0 and "without an API key" in r.output


def test_full_queue_answers_429(verifier):
    release = threading.Event()
    entered = threading.Event()

    class Slow:
        att, classifier, classifier_id = verifier.att, verifier.classifier, verifier.classifier_id

        def n_tokens(self, task, q, s):
            return verifier.n_tokens(task, q, s)

        def verify(self, *a, **k):
            entered.set()
            release.wait(30)
            return verifier.verify(*a, **k)

    client = TestClient(create_app(Slow(), ServiceSettings(max_queue=0, retry_after_s=2)))  # type: ignore[arg-type]
    first: dict = {}
    t = threading.Thread(target=lambda: first.update(r=client.post("/v1/verify", json=FAULTY)))
    t.start()
    assert entered.wait(30)
    r = client.post("/v1/verify", json=FAULTY)
    assert r.status_code == 429 and r.headers["Retry-After"] == "2"
    release.set()
    t.join(60)
    assert first["r"].status_code == 200


def test_an_accepted_request_waits_at_most_max_wait_then_503_and_metrics_count_it(verifier):
    """While the model is held, a queued request is answered 503 with Retry-After after ``max_wait_s`` (not left
    waiting); /metrics reports the queue, the waits, the statuses and the engine's stage times."""
    import time

    release, entered = threading.Event(), threading.Event()

    class Slow:
        att, classifier, classifier_id = verifier.att, verifier.classifier, verifier.classifier_id

        def n_tokens(self, task, q, s):
            return verifier.n_tokens(task, q, s)

        def verify(self, *a, **k):
            if not entered.is_set():
                entered.set()
                release.wait(30)
            return verifier.verify(*a, **k)

    client = TestClient(create_app(Slow(), ServiceSettings(max_queue=4, max_wait_s=0.5, retry_after_s=3)))  # type: ignore[arg-type]
    first: dict = {}
    t = threading.Thread(target=lambda: first.update(r=client.post("/v1/verify", json=FAULTY)))
    t.start()
    assert entered.wait(30)
    start = time.monotonic()
    r = client.post("/v1/verify", json=FAULTY)
    waited = time.monotonic() - start
    assert r.status_code == 503 and r.headers["Retry-After"] == "3" and 0.45 <= waited < 5, (r.status_code, waited)
    release.set()
    t.join(60)
    assert first["r"].status_code == 200
    assert client.post("/v1/verify", json=FAULTY).status_code == 200  # the model is free again
    text = client.get("/metrics").text
    assert 'crv_requests_total{path="/v1/verify",status="503"} 1' in text
    assert 'crv_requests_total{path="/v1/verify",status="200"} 2' in text
    assert "crv_queue_wait_seconds_count 2" in text and "crv_queue_length 0" in text
    assert 'crv_stage_seconds_total{stage="forward"}' in text


def test_intervene_endpoint(verifier):
    client = TestClient(create_app(verifier))
    r = client.post("/v1/intervene", json={**FAULTY, "step_index": 2, "features": "auto", "mode": "clamp"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["before"] == FAULTY["steps"][2] and 1 <= len(out["features"]) <= 3 and isinstance(out["position"], int)
    assert out["steps"][:2] == FAULTY["steps"][:2] and len(out["labels"]) == len(out["steps"])
    assert out["descriptions"] == [verifier.features.card(l, f).description for l, f in out["features"]]  # named
    r = client.post("/v1/intervene", json={**FAULTY, "step_index": 1, "features": [[0, 5], [2, 9]], "mode": "scale", "value": 2})
    assert r.status_code == 200 and r.json()["features"] == [[0, 5], [2, 9]]
    r = client.post("/v1/intervene", json={**FAULTY, "step_index": 5})
    assert r.status_code == 422 and "out of range" in r.json()["detail"]
    r = client.post("/v1/intervene", json={**FAULTY, "step_index": 0, "features": [[99, 1]]})
    assert r.status_code == 422 and "layer 99" in r.json()["detail"]
    r = client.post("/v1/intervene", json={**FAULTY, "question": "((", "step_index": 0})
    assert r.status_code == 422 and "not a valid arith question" in r.json()["detail"]


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=10)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(
    json_values,
    st.fixed_dictionaries({"task": st.sampled_from(["arith", "bool", "x"]), "question": st.text(max_size=30),
                           "steps": st.lists(st.text(max_size=25), max_size=4)},
                          optional={"include_graph": st.booleans(), "text": st.text(max_size=20)}),
))
def test_fuzzed_requests_never_give_a_server_error(verifier_app, body):
    r = verifier_app.post("/v1/verify", json=body)
    assert r.status_code in (200, 413, 422), (body, r.status_code, r.text)
    assert "detail" in r.json() or "steps" in r.json()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.fixed_dictionaries({"task": st.sampled_from(["arith", "bool"]), "question": st.text("0123456789+-*() ", min_size=1, max_size=12),
                                   "steps": st.lists(st.text("0123456789+-*()=> ", min_size=1, max_size=16), min_size=1, max_size=3),
                                   "step_index": st.integers(-1, 4)},
                                  optional={"features": st.one_of(st.just("auto"), st.lists(st.tuples(st.integers(-2, 5), st.integers(-1, 3000)), max_size=3)),
                                            "mode": st.sampled_from(["clamp", "scale", "set", "nope"])}))
def test_fuzzed_interventions_never_give_a_server_error(verifier_app, body):
    r = verifier_app.post("/v1/intervene", json=body)
    assert r.status_code in (200, 413, 422), (body, r.status_code, r.text)


def test_client_and_verify_cli_against_a_real_server(live_server, tmp_path):
    from crv.client import Client, ServiceError

    url = live_server.url
    with Client(url) as c:
        steps = c.verify(FAULTY["task"], FAULTY["question"], FAULTY["steps"])
        assert len(steps) == 3 and all("p_faulty" in s for s in steps)
        assert c.model()["model"]
        with pytest.raises(ServiceError, match="422"):
            c.verify("arith", "1+1", ["1+1=2 € 2"])
    data = tmp_path / "traces.jsonl"
    data.write_text(json.dumps({**FAULTY, "problem_id": "p0"}) + "\n" + json.dumps({**FAULTY, "problem_id": "p1"}) + "\n")
    out = tmp_path / "verdicts.jsonl"
    r = CliRunner().invoke(cli, ["verify", str(data), "--server", url, "--out", str(out)])
    assert r.exit_code == 0, r.output
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert [row["problem_id"] for row in rows] == ["p0", "p1"]
    assert [s["p_faulty"] for s in rows[0]["steps"]] == pytest.approx([s["p_faulty"] for s in steps])
    assert "2 traces, 6 steps" in r.output


@pytest.mark.slow
def test_viewer_page_in_headless_chromium(live_server):
    from playwright import sync_api  # a dev dependency
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is needed for the browser test (make test installs it)"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--headless=new"])
        try:
            page = browser.new_page()
            page.goto(live_server.url + "/")
            page.wait_for_selector("#examples option", state="attached")
            page.click("#verify")
            page.wait_for_selector("#steplist li.step", timeout=60_000)
            items = page.query_selector_all("#steplist li.step")
            assert len(items) == 4
            p_faulty = [float(li.get_attribute("data-p-faulty")) for li in items]
            flagged = ["flagged" in li.get_attribute("class") for li in items]
            # the page highlights exactly the steps the service flags, coloured by p_faulty
            direct = TestClient(create_app(live_server.verifier)).post("/v1/verify", json=FLAGGED).json()["steps"]
            assert p_faulty == pytest.approx([s["p_faulty"] for s in direct], abs=1e-4)
            assert flagged == [s["flagged"] for s in direct]
            assert flagged == [False, False, False, True], "the faulty step (11*47=587) is the one highlighted"
            items[3].click()
            page.wait_for_selector("#graph circle.node.feature")
            assert page.locator("#graph line").count() > 0
            # a flagged step's top features carry their descriptions; clicking a feature node shows its card
            assert page.locator("#top-features tr.feature-row td:nth-child(5)").first.inner_text().strip()
            page.locator("#graph circle.node.feature").first.click()
            page.wait_for_function("document.getElementById('feature-card').textContent.includes('WeightLens in')")
            assert page.locator("#feature-card .example .tok.hl").count() > 0
            page.click("#intervene")
            page.wait_for_function("document.getElementById('intervene-out').textContent.includes('before:')", timeout=60_000)
        finally:
            browser.close()


def test_model_work_runs_on_one_thread_that_exits_with_the_app(verifier):
    seen: list[threading.Thread] = []
    app = create_app(verifier, ServiceSettings(torch_threads=1))
    original = verifier.verify

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(threading.current_thread())
        return original(*args, **kwargs)

    verifier.verify = spy  # type: ignore[method-assign]
    try:
        with TestClient(app) as client:
            for _ in range(3):
                r = client.post("/v1/verify", json={"task": "arith", "question": "2+3", "steps": ["2+3=5 => 5"]})
                assert r.status_code == 200, r.text
    finally:
        del verifier.verify
    assert len(seen) == 3 and len(set(seen)) == 1 and seen[0].name.startswith("crv-model"), seen
    assert seen[0] is not threading.main_thread()
    assert not seen[0].is_alive()  # the app's shutdown stopped it


@pytest.mark.slow
def test_sigterm_lets_the_request_in_flight_finish(tmp_path):
    """`crv serve` on SIGTERM stops accepting, answers the request it is working on, and exits 0."""
    import os
    import signal
    import socket
    import subprocess
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    crv = str(Path(sys.executable).with_name("crv"))
    proc = subprocess.Popen([crv, "serve", "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        result: dict = {}
        long = {**FAULTY, "steps": FAULTY["steps"] * 4}  # 12 steps: long enough to be in flight
        t = threading.Thread(target=lambda: result.update(r=httpx.post(url + "/v1/verify", json=long, timeout=60)))
        t.start()
        time.sleep(0.3)
        os.kill(proc.pid, signal.SIGTERM)
        t.join(60)
        assert result["r"].status_code == 200 and len(result["r"].json()["steps"]) == 12
        assert proc.wait(60) == 0
        assert "stopped" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_feature_card_endpoint_and_flagged_descriptions(verifier):
    """GET /v1/features/{layer}/{index} serves the shipped descriptions; an out-of-range feature is a 404 that
    names the range; a flagged step's first top features carry their descriptions, an unflagged step's none."""
    client = TestClient(create_app(verifier))
    card = client.get("/v1/features/0/12").json()
    assert card["layer"] == 0 and card["index"] == 12 and card["description"]
    assert {"input_tokens", "output_tokens", "upstream", "examples", "context_independent"} <= set(card)
    assert card == json.loads(json.dumps(verifier.features.card(0, 12).to_dict()))
    for path, needle in (("/v1/features/0/99999", "features 0..1023"), ("/v1/features/7/1", "layers 0..3")):
        r = client.get(path)
        assert r.status_code == 404 and needle in r.json()["detail"]
    steps = client.post("/v1/verify", json=FLAGGED).json()["steps"]
    flagged = [s for s in steps if s["flagged"]]
    assert flagged, "the shipped verifier flags 11*47=587"
    for s in steps:
        described = [f["description"] for f in s["top_features"]]
        if s["flagged"]:
            assert all(described[:5]) and not any(described[5:])
            first = s["top_features"][0]
            assert described[0] == verifier.features.card(first["layer"], first["feature"]).description
        else:
            assert not any(described)
    locked = TestClient(create_app(verifier, ServiceSettings(api_key="s3cret")))
    assert locked.get("/v1/features/0/12").status_code == 401
    assert locked.get("/v1/features/0/12", headers={"X-API-Key": "s3cret"}).status_code == 200
