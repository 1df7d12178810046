"""Property-based fuzzing of every route in /openapi.json (schemathesis): valid and
invalid inputs alike, against a real uvicorn server. No 5xx, no hang."""

from __future__ import annotations

from collections.abc import Iterator

import hypothesis
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error

from server.app import create_app
from server.settings import Settings
from tests.server.fakes import FakeTextModel
from tests.server.live import threaded_server

# The fake model's poison pill is a string the fuzzer will not produce.
MODEL = FakeTextModel(poison="\x00poison-pill-9f1c2e\x00")


# The app is built at import, so that its schema can be read without running it; the
# model loads (and the server listens) only in the `base_url` fixture.
APP = create_app(Settings(max_text_chars=512), model=MODEL)  # type: ignore[arg-type]
schema = schemathesis.openapi.from_dict(APP.openapi())


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with threaded_server(APP) as url:
        yield url


@schema.parametrize()
@hypothesis.settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=list(hypothesis.HealthCheck),
    derandomize=True,
)
def test_no_route_answers_5xx_or_hangs(case: schemathesis.Case, base_url: str) -> None:
    response = case.call(base_url=base_url, timeout=10)  # a hang fails as a timeout
    headers = {k.lower() for k in (case.headers or {})}
    if response.status_code == 504 and "x-request-timeout-ms" in headers:
        # The fuzzer asked for a deadline of a millisecond or so: 504 is the answer.
        body = response.json()
        kind = body["error"]["code"] if case.path.startswith("/v1/") else body["type"]
        assert kind == "deadline_exceeded"
        return
    case.validate_response(response, checks=[not_a_server_error])
