"""Dashboard tests reuse the API fixtures (TestClient, two projects' keys, uploads) and the live stack
of the end-to-end tests (a real ``ipo serve`` and ``ipo worker`` with the tiny model)."""

from __future__ import annotations

from tests.api.conftest import auth, client, good_jsonl, migrated_url, other_auth, settings, upload  # noqa: F401
from tests.e2e.conftest import stack  # noqa: F401
