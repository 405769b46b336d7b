"""The engine in this process: a trained adapter changes the replies, and the engine's reply is exactly what a
direct PEFT ``generate`` gives; stop sequences, the time bound and LRU eviction."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from contracts.chat import ChatCompletionRequest
from inference.engine import Engine, EngineError
from inference.text_stream import TextAssembler
from tests.inference.conftest import TrainedRun

PROMPT = [{"role": "user", "content": "Tell me about the moon."}]


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path, trained_run: TrainedRun) -> Engine:
    eng = Engine(tiny_model_dir, "tiny-mistral", device="cpu", max_adapters=2)
    eng.load_adapter("tuned", trained_run.adapter)
    return eng


def _request(model: str, **kw: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": model, "messages": PROMPT, **kw})


def _reply(engine: Engine, model: str, **kw: object) -> str:
    req = _request(model, **kw)
    return engine.generate(engine.prepare(req, 256), req).text


def test_adapter_changes_replies_and_matches_direct_peft_generate(
    engine: Engine, tiny_model_dir: Path, trained_run: TrainedRun
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"seed": 7, "temperature": 0.8, "top_p": 0.95, "max_tokens": 24}
    base = _reply(engine, "tiny-mistral", **kw)
    tuned = _reply(engine, "tuned", **kw)
    assert base != tuned
    assert _reply(engine, "tiny-mistral", **kw) == base  # same seed, same reply (adapter switched off again)

    tokenizer = AutoTokenizer.from_pretrained(str(trained_run.adapter))
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32), str(trained_run.adapter)
    ).eval()
    ids: Any = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    torch.manual_seed(7)
    out = model.generate(
        **ids, do_sample=True, temperature=0.8, top_p=0.95, top_k=0, max_new_tokens=24,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    direct = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert tuned == direct

    greedy = _reply(engine, "tuned", temperature=0, max_tokens=16)
    with torch.no_grad():
        out = model.generate(**ids, do_sample=False, max_new_tokens=16, pad_token_id=tokenizer.pad_token_id)
    assert greedy == tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def test_stop_sequence_is_cut_and_never_sent(engine: Engine) -> None:
    full = _reply(engine, "tiny-mistral", temperature=0, max_tokens=40, min_tokens=40)
    assert len(full) > 6
    stop = full[3:6]
    deltas: list[str] = []
    req = _request("tiny-mistral", temperature=0, max_tokens=40, min_tokens=40, stop=[stop])
    gen = engine.generate(engine.prepare(req, 256), req, on_text=deltas.append)
    assert gen.text == full[: full.index(stop)] == "".join(deltas)
    assert gen.finish_reason == "stop"


def test_assembler_holds_back_a_possible_stop_prefix() -> None:
    class Chars:
        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            return "".join(chr(i) for i in ids)

    a = TextAssembler(Chars(), ["END"])
    assert a.add([ord("a"), ord("E")]) == "a"  # "E" may start "END"
    assert a.add([ord("x")]) == "Ex"
    assert a.add([ord("E"), ord("N"), ord("D"), ord("z")]) == ""
    assert a.stopped and a.text == "aEx"


@pytest.mark.parametrize("seed", range(5))
def test_incremental_decoding_gives_what_decoding_everything_gives(tiny_model_dir: Path, seed: int) -> None:
    """Random token ids, added a few at a time: the deltas join to ``decode(all ids)`` (multi-byte characters
    split across tokens, special tokens and word-start spaces included), with and without a stop sequence."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    rng = torch.Generator().manual_seed(seed)
    text = "Héllo wörld, naïve café 日本語 🙂 — the moon is 384400 km away. "
    ids = tokenizer(text * 3, add_special_tokens=False)["input_ids"]
    ids += torch.randint(0, len(tokenizer), (120,), generator=rng).tolist()
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    a, deltas, i = TextAssembler(tokenizer, []), [], 0
    while i < len(ids):
        step = int(torch.randint(1, 4, (1,), generator=rng))
        deltas.append(a.add(ids[i : i + step]))
        i += step
    deltas.append(a.finish())
    assert "".join(deltas) == whole == a.text

    stop = whole[len(whole) // 2 : len(whole) // 2 + 3]
    b = TextAssembler(tokenizer, [stop])
    sent = "".join(b.add([t]) for t in ids) + b.finish()
    assert b.stopped and sent == b.text == whole[: whole.index(stop)]


def test_assembler_sends_invalid_bytes_at_once_and_waits_only_for_a_split_character() -> None:
    """A model emitting bytes that never form a character (the tiny model off its training data) streams them
    as they come; only the last replacement character (maybe a character still arriving) waits."""

    class Bytes:
        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            return bytes(ids).decode("utf-8", errors="replace")

    a = TextAssembler(Bytes(), [])
    sent = [a.add([b]) for b in b"\xff\xff\xffA" + "\u20ac".encode()]
    assert sent == ["", "\ufffd", "\ufffd", "\ufffdA", "", "", "\u20ac"]
    assert a.finish() == "" and a.text == "\ufffd\ufffd\ufffdA\u20ac"


def test_generation_is_bounded_in_time_and_cancellable(engine: Engine) -> None:
    req = _request("tiny-mistral", max_tokens=400, min_tokens=400, temperature=0)
    prepared = engine.prepare(req, 1000)
    gen = engine.generate(prepared, req, max_time=0.05)
    assert gen.finish_reason == "length" and 0 < gen.completion_tokens < 400
    cancel = threading.Event()
    seen: list[str] = []

    def on_text(t: str) -> None:
        seen.append(t)
        cancel.set()  # the client goes away after the first piece of text

    gen = engine.generate(prepared, req, cancel=cancel, on_text=on_text)
    assert gen.finish_reason == "cancelled" and gen.completion_tokens < 400


def test_context_and_cap_errors_name_the_field(engine: Engine) -> None:
    long = ChatCompletionRequest.model_validate(
        {"model": "tiny-mistral", "messages": [{"role": "user", "content": "moon " * 600}]}
    )
    with pytest.raises(EngineError) as err:
        engine.prepare(long, 256)
    assert err.value.status == 400 and err.value.param == "messages" and "512" in err.value.message
    with pytest.raises(EngineError) as err:
        engine.prepare(_request("tiny-mistral", max_completion_tokens=300), 256)
    assert err.value.param == "max_completion_tokens"
    with pytest.raises(EngineError) as err:
        engine.prepare(_request("tiny-mistral", max_tokens=505), 1000)
    assert err.value.param == "max_tokens" and err.value.code == "context_length_exceeded"
    with pytest.raises(EngineError) as err:
        engine.prepare(_request("nope"), 256)
    assert err.value.status == 404


def test_least_recently_used_adapter_is_evicted(tiny_model_dir: Path, trained_run: TrainedRun, tmp_path: Path) -> None:
    eng = Engine(tiny_model_dir, "tiny-mistral", device="cpu", max_adapters=2)
    for step, path in sorted(trained_run.checkpoints.items()):
        eng.load_adapter(f"ckpt-{step}", path)
    eng.load_adapter("final", trained_run.adapter)
    assert list(eng.adapters) == ["ckpt-4", "final"] and eng.evictions == 1
    eng.prepare(_request("ckpt-4"), 16)  # used: now "final" is the least recent
    shutil.copytree(trained_run.adapter, tmp_path / "again")
    eng.load_adapter("again", tmp_path / "again")
    assert list(eng.adapters) == ["ckpt-4", "again"]
    with pytest.raises(EngineError) as err:
        eng.prepare(_request("final"), 16)
    assert err.value.status == 404
    assert _reply(eng, "again", seed=1, max_tokens=8) == _reply(eng, "again", seed=1, max_tokens=8)
