"""Property-based check of the live server against its own ``/openapi.json`` (schemathesis).

Bounded: a few examples per public operation (about 100 requests in all, well under a minute). Every
answer must be a non-5xx with a documented status, content type and a body matching the declared schema.
Driven through hypothesis directly: schemathesis' pytest plugin (``from_fixture``) does not run on pytest 9.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import checks  # noqa: E402

from tests.sdk.conftest import LiveServer  # noqa: E402

EXAMPLES_PER_OPERATION = 6
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
]


def test_public_api_conforms_to_its_openapi(live_server: LiveServer) -> None:
    key = live_server.new_key()
    full = schemathesis.openapi.from_url(f"{live_server.url}/openapi.json")
    full.validate()  # the document itself is valid OpenAPI (against the bundled meta-schema)
    schema = full.include(path_regex="^/v1/")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    statuses: list[int] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case) -> None:
            if isinstance(case.query, dict) and case.query.get("stream") not in (None, False, "false"):
                case.query["stream"] = False  # an SSE stream of a live job never ends by itself
            response = case.call_and_validate(
                base_url=live_server.url, headers={"Authorization": f"Bearer {key}"}, checks=CHECKS, timeout=10
            )
            statuses.append(response.status_code)

        check()
    assert len(statuses) >= 3 * len(operations) and any(s == 200 for s in statuses), statuses
