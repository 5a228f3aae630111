"""The OpenAPI schema is the contract: schemathesis sends schema-valid requests to every operation, with every
check (no 5xx, status codes and response bodies as documented, schema-valid data accepted), plus each operation's
documented example, which must be answered 200. Bounded: 25 Hypothesis examples per operation.

Two allowances, stated here. 413 counts as an acceptable answer to schema-valid data: the limits on a request's
*total* size (characters over all steps, tokens of the formatted trace vs the model's context) are sums over
fields, which JSON Schema cannot state. And ``/v1/intervene`` may answer 422 to schema-valid data: it solves the
question to judge a fix, so the question must parse in the task's grammar, which a pattern cannot state either.
Everything per field is in the schema (step count, blank steps, exactly one of steps / text, valid Unicode, the
model's character set, finite bounded values), and every other check runs everywhere."""

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

ACCEPTED = ["2xx", "3xx", "401", "403", "404", "409", "413", "429"]


@pytest.mark.slow
def test_every_operation_keeps_the_contract(verifier):
    from crv.api.app import ServiceSettings, create_app

    config = schemathesis.Config.from_dict({"checks": {"positive_data_acceptance": {"expected-statuses": ACCEPTED}}})
    app = create_app(verifier, ServiceSettings(max_wait_s=30.0))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=config)
    operations = [result.ok() for result in schema.get_all_operations()]
    names = {f"{op.method.upper()} {op.path}" for op in operations}
    assert names >= {"POST /v1/verify", "POST /v1/intervene", "GET /v1/model", "GET /healthz",
                     "GET /v1/features/{layer}/{index}"}, names
    statuses: dict[str, set[int]] = {}
    for op in operations:
        name = f"{op.method.upper()} {op.path}"
        strategies = [op.as_strategy(), *op.get_strategies_from_examples()]
        for n, strategy in enumerate(strategies):
            @settings(max_examples=25 if n == 0 else 1, deadline=None, suppress_health_check=list(HealthCheck),
                      database=None, derandomize=True)
            @given(case=strategy)
            def check(case) -> None:  # type: ignore[no-untyped-def]
                grammar = [positive_data_acceptance] if name == "POST /v1/intervene" and n == 0 else []
                response = case.call_and_validate(excluded_checks=grammar)
                statuses.setdefault(name, set()).add(response.status_code)

            check()
    for name, seen in statuses.items():
        assert 200 in seen, (name, seen)
