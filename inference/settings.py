"""Inference server settings: environment variables with prefix ``IPO_``, each with an embedded default."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from contracts.logs import LogFormat


class InferenceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IPO_", extra="ignore")

    var_dir: Path = Path("./var")
    models_dir: Path | None = None
    """Base models, one directory each (the API's allow-list). Default ``{var_dir}/models``."""
    adapters_dir: Path | None = None
    """Unpacked adapters the API hands over by path (``POST /v1/load_lora_adapter``); a ``lora_path``
    outside it is refused. Default ``{var_dir}/adapters``. The API must see it at the same path."""
    inference_model: str | None = None
    """The base model to serve (a directory name under ``models_dir``). Default: ``tiny-mistral`` when
    present, else the first model directory by name."""
    device: str = "auto"
    """``auto`` (CUDA when present), ``cuda`` or ``cpu`` (``IPO_DEVICE``, shared with the worker)."""
    inference_max_adapters: int = Field(8, ge=1)
    """LoRA adapters kept loaded at once; loading one more evicts the least recently used. A rank-16
    adapter of a 7B model on q/k/v/o is about 27 MB, so 8 cost little next to the base model."""
    inference_max_concurrent: int = Field(4, ge=1)
    """Requests admitted at once (one generates, the others wait their turn); more get a 429 with
    ``Retry-After``."""
    inference_max_tokens: int = Field(2048, ge=1)
    """Largest ``max_tokens`` accepted (400 above it); also the reply limit when a request gives none."""
    inference_timeout_seconds: float = Field(120.0, gt=0)
    """Wall-clock bound of one reply (transformers' ``max_time``): it ends with ``finish_reason="length"``."""
    log_level: str = "INFO"
    log_format: LogFormat = "auto"

    @property
    def resolved_models_dir(self) -> Path:
        return self.models_dir or self.var_dir / "models"

    @property
    def resolved_adapters_dir(self) -> Path:
        return (self.adapters_dir or self.var_dir / "adapters").resolve()

    def resolved_model(self) -> str:
        """The base model's directory name; raises ``FileNotFoundError`` when there is none to serve."""
        root = self.resolved_models_dir
        if self.inference_model:
            if not (root / self.inference_model / "config.json").is_file():
                raise FileNotFoundError(
                    f"IPO_INFERENCE_MODEL={self.inference_model}: no {root / self.inference_model}/config.json"
                )
            return self.inference_model
        names = sorted(p.name for p in root.iterdir() if (p / "config.json").is_file()) if root.is_dir() else []
        if not names:
            raise FileNotFoundError(f"no base model under {root} (build one: ipo models build-tiny)")
        return "tiny-mistral" if "tiny-mistral" in names else names[0]
