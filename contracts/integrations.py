"""The ``integrations`` of a fine-tuning job: experiment trackers the trainer logs the run to.

``{"type": "wandb", "wandb": {"project", "name", "entity", "tags"}}`` is OpenAI's shape (its only type);
``{"type": "mlflow", "mlflow": {"tracking_uri", "experiment_name", "run_name", "tags",
"register_model_as"}}`` is this service's extension. Validated by the API at job creation
(``parse_integrations``: 400 naming the field, e.g. ``integrations[0].mlflow.tracking_uri``), stored on
the job, and handed to the worker in the claim; the trainer logs through them
(``worker/training/trackers.py``).

Credentials never travel in a job body: the worker reads them from its own environment
(``WANDB_API_KEY``, ``MLFLOW_TRACKING_TOKEN``, ``MLFLOW_TRACKING_USERNAME``/``PASSWORD``), and anything
that looks like a secret in the block (a key named like ``api_key``/``token``/``password``/``secret``,
userinfo or a credential query parameter in ``tracking_uri``) is refused.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, urlsplit

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

MAX_INTEGRATIONS = 4
"""One of each kind is the useful most; a few more leave room for two MLflow servers."""

_SECRET_NAME = re.compile(
    r"(api[_-]?key|apikey|token(?!s|iz)|passw(or)?d|passwd|secret|credential|authorization|bearer)", re.IGNORECASE
)
"""What a key named like a credential looks like (``WANDB_API_KEY``, ``access_token``, ``password``...)."""

CREDENTIALS_HINT = (
    "Credentials never go in a job body: the worker reads them from its own environment "
    "(WANDB_API_KEY; MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD)."
)

Name = Annotated[str, Field(min_length=1, max_length=128)]
TagText = Annotated[str, Field(min_length=1, max_length=64)]
"""W&B tags: OpenAI limits each to 64 characters."""
MlflowTagKey = Annotated[str, Field(min_length=1, max_length=250)]
"""MLflow's limit on a tag key (``mlflow.utils.validation.MAX_ENTITY_KEY_LENGTH`` = 250)."""
MlflowTagValue = Annotated[str, Field(max_length=5000)]
"""MLflow's limit on a tag value is 8000 characters; 5000 keeps a body small."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WandbIntegration(_Strict):
    """OpenAI's ``wandb`` block: where the run goes in Weights & Biases."""

    project: Name
    """The W&B project the run is created in."""
    name: Name | None = None
    """Display name of the run; default: the job id."""
    entity: Name | None = None
    """The W&B team or user; default: the API key's default entity (the worker's ``WANDB_ENTITY``)."""
    tags: Annotated[list[TagText], Field(max_length=50)] | None = None
    """Added to the run's tags (the job id, attempt and base model are always added)."""


class MlflowIntegration(_Strict):
    """This service's ``mlflow`` block: the tracking server, experiment, run and registered model."""

    tracking_uri: Annotated[str, Field(min_length=1, max_length=2000)] | None = None
    """``http(s)://host[:port][/path]`` of the tracking server; default: the worker's ``MLFLOW_TRACKING_URI``.
    Userinfo (``user:pass@``) and credential query parameters are refused."""
    experiment_name: Annotated[str, Field(min_length=1, max_length=500)] | None = None
    """Created when missing; default: the worker's ``MLFLOW_EXPERIMENT_NAME``, else ``ipo-align``."""
    run_name: Name | None = None
    """Default: the job id."""
    tags: Annotated[dict[MlflowTagKey, MlflowTagValue], Field(max_length=50)] | None = None
    """Added to the run's tags (``ipo.job_id``, ``ipo.attempt`` and the lineage are always set)."""
    register_model_as: Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][\w.\- ]*$")] | None = (
        None
    )
    """Register the final adapter as a new version of this MLflow registered model (the base model recorded
    in its tags)."""

    @field_validator("tracking_uri")
    @classmethod
    def _plain_http_uri(cls, value: str | None) -> str | None:
        if value is None:
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL of an MLflow tracking server")
        if parts.username is not None or parts.password is not None:
            raise ValueError(f"must not carry credentials (user:password@). {CREDENTIALS_HINT}")
        for key, _ in parse_qsl(parts.query, keep_blank_values=True):
            if _SECRET_NAME.search(key):
                raise ValueError(f"must not carry credentials (query parameter {key!r}). {CREDENTIALS_HINT}")
        return value


class WandbBlock(_Strict):
    type: Literal["wandb"]
    wandb: WandbIntegration


class MlflowBlock(_Strict):
    type: Literal["mlflow"]
    mlflow: MlflowIntegration


Integration = Annotated[WandbBlock | MlflowBlock, Field(discriminator="type")]
"""One entry of a job's ``integrations`` list, told apart by ``type``."""
INTEGRATION_TYPES = ("wandb", "mlflow")

_ADAPTER: TypeAdapter[WandbBlock | MlflowBlock] = TypeAdapter(Integration)


class IntegrationError(ValueError):
    """A bad ``integrations`` entry; ``param`` names the field (``integrations[0].mlflow.tracking_uri``)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message


def secret_field(value: Any, path: str) -> str | None:
    """The path of the first key (at any depth of ``value``) named like a credential, or None.

    Keys are matched against ``api_key``, ``token``, ``password``, ``secret``, ``credential``,
    ``authorization``, ``bearer`` (case-insensitive, anywhere in the name): ``WANDB_API_KEY``,
    ``access_token`` and ``mlflow_password`` all match; ``max_tokens`` and ``tokenizer`` do not. Tag keys
    count too (a tag is visible to everyone who can read the run)."""
    stack: list[tuple[Any, str]] = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, dict):
            for key, inner in item.items():
                here = f"{where}.{key}"
                if _SECRET_NAME.search(str(key)):
                    return here
                stack.append((inner, here))
        elif isinstance(item, list):
            stack.extend((inner, f"{where}[{i}]") for i, inner in enumerate(item))
    return None


def parse_integrations(raw: Any, field: str = "integrations") -> list[WandbBlock | MlflowBlock]:
    """Validate a job's ``integrations`` (a JSON list) into typed blocks.

    Raises ``IntegrationError`` naming the first bad field: not a list, more than ``MAX_INTEGRATIONS``,
    an unknown ``type``, a block whose key is not its type, an unknown or malformed field, or anything
    that looks like a secret (``secret_field``, ``MlflowIntegration.tracking_uri``)."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise IntegrationError(field, "must be a list of {type, <type>: {...}} objects")
    if len(raw) > MAX_INTEGRATIONS:
        raise IntegrationError(field, f"at most {MAX_INTEGRATIONS} integrations per job")
    parsed: list[WandbBlock | MlflowBlock] = []
    for i, entry in enumerate(raw):
        where = f"{field}[{i}]"
        if isinstance(entry, WandbBlock | MlflowBlock):
            parsed.append(entry)
            continue
        if not isinstance(entry, dict):
            raise IntegrationError(where, 'must be an object like {"type": "wandb", "wandb": {...}}')
        kind = entry.get("type")
        if kind not in INTEGRATION_TYPES:
            known = ", ".join(INTEGRATION_TYPES)
            raise IntegrationError(f"{where}.type", f"unknown integration type {kind!r}; known: {known}")
        if (secret := secret_field(entry, where)) is not None:
            raise IntegrationError(secret, f"looks like a credential. {CREDENTIALS_HINT}")
        try:
            parsed.append(_ADAPTER.validate_python(entry))
        except ValidationError as exc:
            error = exc.errors()[0]
            # pydantic puts the chosen tag first (``('mlflow', 'mlflow', 'tracking_uri')``): drop it.
            loc = list(error["loc"][1:]) if error["loc"] and error["loc"][0] == kind else list(error["loc"])
            path = where + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)
            message = str(error["msg"]).removeprefix("Value error, ")
            raise IntegrationError(path, message) from exc
    return parsed


DEFAULT_ALLOWED_TRACKING_URIS = ("http://127.0.0.1", "http://localhost", "http://[::1]")
"""``IPO_MLFLOW_ALLOWED_URIS``'s default: an MLflow server on the worker's own machine (``mlflow server`` on a
laptop, any port). A ``tracking_uri`` in a job body makes the worker send HTTP requests to that host, and
the server's error replies come back in the job's warning events: on a shared service, naming an internal
host is server-side request forgery. Operators list their tracking servers (or ``*``) instead. A job that
names no ``tracking_uri`` uses the worker's ``MLFLOW_TRACKING_URI``, which is always allowed."""


def parse_allowed_uris(value: Any) -> list[str]:
    """``IPO_MLFLOW_ALLOWED_URIS`` (comma-separated, or a list) as a list of entries, each ``*`` or
    ``http(s)://host[:port][/path]`` (``host`` may start with ``*.``). Raises ``ValueError`` on any other entry."""
    parts = [p.strip() for p in value.split(",")] if isinstance(value, str) else [str(p).strip() for p in value]
    entries = [p for p in parts if p]
    for entry in entries:
        if entry == "*":
            continue
        split = urlsplit(entry)
        if split.scheme not in ("http", "https") or not split.hostname or split.query or split.username:
            raise ValueError(f"{entry!r} is not '*' or an http(s)://host[:port][/path] prefix")
        split.port  # noqa: B018 - raises ValueError on a bad port
    return entries


def tracking_uri_allowed(uri: str, allowed: list[str] | tuple[str, ...]) -> bool:
    """Whether ``uri`` (an ``http(s)://`` URL) matches an entry of ``allowed`` (``parse_allowed_uris``).

    An entry matches when the scheme is the same, the host is the same (case-insensitive; ``*.corp`` matches
    any subdomain of ``corp``, not ``corp`` itself), the port is the same (an entry without a port matches
    every port) and the URL's path starts with the entry's path, segment by segment. ``*`` matches all."""
    parts = urlsplit(uri)
    host = (parts.hostname or "").lower()
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return False
    path = parts.path.rstrip("/") + "/"
    for entry in allowed:
        if entry == "*":
            return True
        rule = urlsplit(entry)
        rule_host = (rule.hostname or "").lower()
        if rule.scheme != parts.scheme:
            continue
        if rule_host.startswith("*."):
            if not host.endswith(rule_host[1:]):
                continue
        elif rule_host != host:
            continue
        if rule.port is not None and rule.port != port:
            continue
        if path.startswith(rule.path.rstrip("/") + "/"):
            return True
    return False


def dump_integrations(blocks: list[WandbBlock | MlflowBlock]) -> list[dict[str, Any]]:
    """The stored / echoed JSON form: each block with its unset optional fields left out."""
    return [block.model_dump(mode="json", exclude_none=True) for block in blocks]
