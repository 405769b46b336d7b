"""Pure ASGI middleware of the API, outermost first: request ids and the access log, HTTP metrics,
authentication from headers (before any body is read), body size limits and the body-read deadline."""
