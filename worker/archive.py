"""Zip/unzip of checkpoint and adapter directories: the code lives in ``contracts.archive`` (the API unpacks
adapters for the inference server with the same zip-slip-safe code)."""

from contracts.archive import UnsafeArchive, unzip_safe, zip_dir

__all__ = ["UnsafeArchive", "unzip_safe", "zip_dir"]
