"""Contracts shared by app/ and worker/: pure pydantic + stdlib, no torch, no sqlalchemy, no fastapi.

- ``method``: the job's ``method`` block (IPO/DPO hyperparameters and LoRA settings) as users send it.
- ``data_formats``: the preference-data validator and normaliser (runs in the API and on the worker).
- ``internal``: the worker <-> API protocol bodies (``/internal/v1``) and the trainer's report lines.
"""
