"""The model side of the inference server: one base model, several LoRA adapters on it, ``generate``.

The base model is loaded once. Adapters are added with PEFT's multi-adapter API (the first one wraps
the base in a ``PeftModel``; later ones go through ``load_adapter``; ``set_adapter`` picks one per
request and ``disable_adapter()`` serves the base model itself). At most ``max_adapters`` stay loaded:
loading one more deletes the least recently used (``delete_adapter``). Each adapter brings its own
tokenizer and chat template (the training run saves them beside the weights); the base model uses its
own directory's.

Every call into the model (``load_adapter``, ``unload_adapter``, ``generate``) runs on one thread (the
server's executor), one at a time: PEFT's active adapter is model-wide state, and on a CPU or a single
GPU one ``generate`` at a time is what the hardware does anyway. ``prepare`` (chat template, length
checks) may run on any thread: the table of loaded adapters is guarded by ``lock``, so a request is
checked at once instead of after the generations queued before it.

Generation is transformers' ``generate`` with a ``BaseStreamer`` that turns new tokens into text deltas
(``text_stream.py``);
a stopping criterion ends it at a stop sequence, on cancellation (the client went away) or after
``max_time`` seconds.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contracts.chat import ChatCompletionRequest
from inference.text_stream import TextAssembler, TokenStreamer


class EngineError(Exception):
    """A request the engine refuses: ``status`` (400/404), ``param`` (the field) and ``code`` for the answer."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


@dataclass
class Adapter:
    name: str
    path: str
    tokenizer: Any
    loaded_at: float = field(default_factory=time.time)


@dataclass
class Prepared:
    """A request checked against the model: the served name, the prompt's token ids, the token limit."""

    adapter: str | None
    tokenizer: Any
    input_ids: list[int]
    max_new_tokens: int


@dataclass
class Generation:
    """What one ``generate`` produced: the reply text (stop sequence cut off), its token count and why it
    ended (OpenAI's ``finish_reason``: ``stop``, ``length``; ``cancelled`` when the client left)."""

    text: str
    completion_tokens: int
    finish_reason: str


def _load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()


def _model_not_found(model: str) -> EngineError:
    return EngineError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")


class Engine:
    """One base model and its LoRA adapters (see the module docstring). Not thread-safe by design: call it
    from one thread. ``device``: ``auto`` (CUDA when present), ``cuda`` or ``cpu``; bf16 on CUDA, fp32 on CPU
    (the worker's choice, ``worker/training/loading.py``). ``max_adapters`` >= 1: adapters kept loaded."""

    def __init__(self, model_dir: Path, name: str, *, device: str = "auto", max_adapters: int = 8) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.name = name
        self.model_dir = model_dir
        self.max_adapters = max(1, max_adapters)
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        base: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
        self.base: Any = base.to(device).eval()
        self.base_tokenizer = _load_tokenizer(str(model_dir))
        self.context = int(getattr(self.base.config, "max_position_embeddings", 0) or 0) or None
        self.model: Any = self.base
        self.adapters: OrderedDict[str, Adapter] = OrderedDict()
        self.lock = threading.RLock()
        """Guards ``adapters`` (and the model's adapter set while it changes)."""
        self.tokenizer_lock = threading.Lock()
        """A fast tokenizer is one Rust object: ``prepare`` (another thread) and decoding take turns."""
        self.evictions = 0

    # -- adapters ----------------------------------------------------------------------------------------------

    def load_adapter(self, name: str, path: Path) -> None:
        """Load the PEFT adapter in ``path`` under ``name``; evict the least recently used one past the cap.

        Raises ``EngineError`` 400 when the name is taken (vLLM's answer) or the directory holds no adapter."""
        with self.lock:
            self._load_adapter(name, path)

    def _load_adapter(self, name: str, path: Path) -> None:
        from peft import PeftModel

        if name == self.name or name in self.adapters:
            raise EngineError(400, f"The lora adapter '{name}' has already been loaded.", param="lora_name")
        if not (path / "adapter_config.json").is_file():
            raise EngineError(400, f"No adapter_config.json in {path}.", param="lora_path", code="invalid_adapter")
        tokenizer = _load_tokenizer(str(path)) if _has_tokenizer(path) else self.base_tokenizer
        try:
            if self.model is self.base:
                self.model = PeftModel.from_pretrained(self.base, str(path), adapter_name=name).eval()
            else:
                self.model.load_adapter(str(path), adapter_name=name)
        except (ValueError, RuntimeError, KeyError, OSError) as exc:
            raise EngineError(
                400, f"The adapter in {path} does not fit {self.name}: {exc}", param="lora_path", code="invalid_adapter"
            ) from exc
        self.model.eval()
        self.adapters[name] = Adapter(name, str(path), tokenizer)
        while len(self.adapters) > self.max_adapters:
            oldest = next(iter(self.adapters))
            self._unload_adapter(oldest)
            self.evictions += 1

    def unload_adapter(self, name: str) -> None:
        """Delete the adapter ``name`` from the model. Raises ``EngineError`` 404 when it is not loaded."""
        with self.lock:
            self._unload_adapter(name)

    def _unload_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise EngineError(404, f"The lora adapter '{name}' cannot be found.", param="lora_name", code="not_found")
        del self.adapters[name]
        if not self.adapters:  # the last one: take the LoRA layers out, back to the plain base model
            self.base = self.model.unload()
            self.model = self.base
            return
        self.model.set_adapter(next(reversed(self.adapters)))
        self.model.delete_adapter(name)

    # -- requests ----------------------------------------------------------------------------------------------

    def prepare(self, request: ChatCompletionRequest, max_tokens_cap: int) -> Prepared:
        """Check ``request`` against the model: a served ``model`` (404 otherwise), a prompt that fits the
        context (400 ``messages``) with room for ``max_tokens`` (400 naming it), a limit under the cap.
        The prompt is the chat template of the adapter's own tokenizer (``add_generation_prompt=True``)."""
        if request.model == self.name:
            adapter, tokenizer = None, self.base_tokenizer
        elif request.model in self.adapters:
            adapter, tokenizer = request.model, self.adapters[request.model].tokenizer
            self.adapters.move_to_end(request.model)
        else:
            raise EngineError(
                404, f"The model `{request.model}` does not exist.", param="model", code="model_not_found"
            )
        limit_param = request.token_limit_param
        if request.token_limit is not None and request.token_limit > max_tokens_cap:
            raise EngineError(
                400,
                f"{limit_param} is {request.token_limit}; this server's limit is {max_tokens_cap}.",
                param=limit_param,
            )
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in request.messages
        ]
        try:
            with self.tokenizer_lock:
                ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as exc:  # a template may raise on roles or orders it does not accept
            raise EngineError(
                400, f"The model's chat template refused these messages: {exc}", param="messages"
            ) from exc
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # BatchEncoding in recent transformers
            ids = ids["input_ids"]
        ids = [int(i) for i in ids]
        context = self.context
        if context is not None:
            if len(ids) >= context:
                raise EngineError(
                    400,
                    f"The messages are {len(ids)} tokens long; this model's context is {context} tokens, "
                    "which leaves no room for a reply.",
                    param="messages",
                    code="context_length_exceeded",
                )
            room = context - len(ids)
            if request.token_limit is not None and request.token_limit > room:
                raise EngineError(
                    400,
                    f"This model's context is {context} tokens; the messages take {len(ids)}, so {limit_param} "
                    f"can be at most {room} (it is {request.token_limit}).",
                    param=limit_param,
                    code="context_length_exceeded",
                )
            max_new = request.token_limit if request.token_limit is not None else min(room, max_tokens_cap)
        else:
            max_new = request.token_limit if request.token_limit is not None else max_tokens_cap
        return Prepared(adapter, tokenizer, ids, max_new)

    def generate(
        self,
        prepared: Prepared,
        request: ChatCompletionRequest,
        *,
        seed_offset: int = 0,
        max_time: float | None = None,
        cancel: threading.Event | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> Generation:
        """One reply. Sampling (``temperature`` > 0, default 1) seeds torch with ``seed`` first when given;
        ``seed_offset`` is added for the 2nd, 3rd... choice of ``n``. ``temperature=0`` is greedy. ``top_p``
        as OpenAI (default 1); no top-k (transformers' default of 50 is switched off). ``on_text`` gets each
        text delta as it is decoded."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        tokenizer = prepared.tokenizer
        assembler = TextAssembler(tokenizer, request.stop_list, self.tokenizer_lock)
        # Text is needed while generating only to stream it or to find a stop sequence; otherwise the reply
        # is decoded once at the end (no per-token work beyond transformers' own loop).
        streamer = TokenStreamer(assembler, on_text) if on_text is not None or request.stop_list else None

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                done = assembler.stopped or (cancel is not None and cancel.is_set())
                return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

        temperature = 1.0 if request.temperature is None else request.temperature
        kwargs: dict[str, Any] = {
            "max_new_tokens": prepared.max_new_tokens,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "stopping_criteria": StoppingCriteriaList([_Stop()]),
            "streamer": streamer,
        }
        if request.min_tokens:
            kwargs["min_new_tokens"] = min(request.min_tokens, prepared.max_new_tokens)
        if max_time is not None:
            kwargs["max_time"] = max_time
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=request.top_p or 1.0, top_k=0)
        else:
            kwargs["do_sample"] = False
        if cancel is not None and cancel.is_set():
            return Generation("", 0, "cancelled")
        if request.seed is not None and temperature > 0:
            torch.manual_seed(request.seed + seed_offset)
        if prepared.adapter is not None and prepared.adapter not in self.adapters:
            # Evicted by a load queued between this request's check and its turn (more distinct adapters
            # in flight than IPO_INFERENCE_MAX_ADAPTERS): the caller loads it again.
            raise _model_not_found(prepared.adapter)
        input_ids = torch.tensor([prepared.input_ids], device=self.device)
        started = time.monotonic()
        with torch.inference_mode():
            mask = torch.ones_like(input_ids)
            if prepared.adapter is None:
                if self.model is self.base:
                    out = self.base.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
                else:
                    with self.model.disable_adapter():
                        out = self.model.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
            else:
                self.model.set_adapter(prepared.adapter)
                out = self.model.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
        if streamer is not None:
            count, last_id = streamer.count, streamer.last_id
        else:
            new_ids = [int(i) for i in out[0, input_ids.shape[1] :].tolist()]
            count, last_id = len(new_ids), (new_ids[-1] if new_ids else None)
            assembler.add(new_ids)
        tail = assembler.finish()
        if tail and on_text is not None:
            on_text(tail)
        if cancel is not None and cancel.is_set():
            reason = "cancelled"
        elif assembler.stopped or last_id == tokenizer.eos_token_id:
            reason = "stop"
        elif count >= prepared.max_new_tokens or (max_time and time.monotonic() - started >= max_time):
            reason = "length"
        else:
            reason = "stop"
        return Generation(assembler.text, count, reason)
