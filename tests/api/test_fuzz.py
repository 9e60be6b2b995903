"""The API fuzzed from its own OpenAPI schema with schemathesis (in-process over ASGI, a bounded number of
examples per operation, valid and invalid data): no 5xx, every status code documented, every response
conforming to its documented schema and content type."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
import msgpack  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from app.main import create_app  # noqa: E402

from .conftest import LOCFRAME, SE, make_settings  # noqa: E402

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def api_schema(tiny_store):
    app = create_app(make_settings(tiny_store, admin_token="fuzz-admin-token",
                                   ensembles={"water-ens": [SE, LOCFRAME]}))
    return schemathesis.openapi.from_asgi("/openapi.json", app)


schema = schemathesis.pytest.from_fixture("api_schema")


def _packable(v):
    """Integers beyond msgpack's 64 bits become strings (a client could not send them otherwise)."""
    if isinstance(v, dict):
        return {k: _packable(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_packable(x) for x in v]
    if isinstance(v, int) and not isinstance(v, bool) and not -(2**63) <= v < 2**64:
        return str(v)
    return v


@schemathesis.serializer("application/msgpack")
def _msgpack(ctx, value):
    """msgpack request bodies (binary fields of raw arrays arrive as bytes or str; msgpack takes both)."""
    return msgpack.packb(_packable(value), use_bin_type=True)


@schema.parametrize()
@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
def test_api_conforms_to_its_schema_under_fuzzing(case):
    case.call_and_validate(checks=CHECKS)
