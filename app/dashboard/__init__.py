"""The web dashboard: server-rendered pages (Jinja2) over the same services as the public API.

A browser logs in by pasting an API key, which is kept in an HttpOnly, SameSite=Strict session cookie
and checked on every request by the API's own ``authenticate``. Only the dashboard's routes read that
cookie; the public ``/v1`` API keeps accepting ``Authorization: Bearer`` only.
"""
