"""Pydantic models of the public HTTP API (OpenAI's object shapes, plus our extensions)."""
