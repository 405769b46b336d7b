"""Artifact storage behind one interface: a local directory today (``file://``)."""

from app.storage.base import Storage, open_storage

__all__ = ["Storage", "open_storage"]
