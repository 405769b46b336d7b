"""Benchmark: the embedded inference server's decode speed against a plain transformers ``generate`` loop on
the same model in the same run, and its streamed first-token latency.

    python -m bench.inference [--device cpu|cuda] [--tokens 128] [--requests 8] [--rounds 3] [--no-record]

(a) reference: this process loads the model with ``AutoModelForCausalLM.from_pretrained`` and, per request,
    applies the chat template and calls ``model.generate(max_new_tokens=N, min_new_tokens=N, do_sample=False)``
    (greedy, every reply exactly N tokens), the loop the transformers docs show. Its first-token latency is
    taken with a ``BaseStreamer`` (time from the call to the first new token).
(b) server: ``ipo inference`` as its own process on the same model directory and device; the same prompts
    one after another over HTTP (``POST /v1/chat/completions``, ``temperature=0``, ``max_tokens=N``,
    ``min_tokens=N``), non-streamed; tokens are the answer's ``usage.completion_tokens``; time is the
    client's wall clock per request, HTTP and JSON included.
(c) streamed: the same requests with ``stream=true``; first-token latency is from sending the request to
    the first chunk with content, at the client.

(a) and (b) alternate in ``--rounds`` rounds so load on a shared machine hits both alike. Target (issue 14):
(b)/(a) tokens/s >= 0.9x. The row goes to the ``inference`` table of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench._common import models_dir_with, pct, record, tiny_model_dir, wait_for_quiet
from ipo_cli.processes import free_port, stop_group, wait_http_ok

TARGET = 0.9
PROMPTS = [
    "What is the capital of Brazil?",
    "Name the largest planet.",
    "How many legs does a spider have?",
    "What colour is the sky on a clear day?",
    "Who wrote Hamlet?",
    "What is two plus two?",
    "Which ocean is the largest?",
    "What do bees make?",
]


def _messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]


class Reference:
    """(a): the plain transformers loop."""

    def __init__(self, model_dir: Path, device: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.device = device
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
        self.model = model.to(device).eval()

    def run(self, i: int, tokens: int, first_token: bool = False) -> tuple[int, float, float | None]:
        """(new tokens, seconds, first-token seconds when asked)."""
        torch = self.torch
        encoded: Any = self.tokenizer.apply_chat_template(
            _messages(i), add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        ids = encoded.to(self.device)
        first: list[float] = []
        start = time.perf_counter()

        class FirstToken:
            seen_prompt = False

            def put(self, value: Any) -> None:
                if not self.seen_prompt:
                    self.seen_prompt = True
                elif not first:
                    first.append(time.perf_counter() - start)

            def end(self) -> None:
                pass

        with torch.inference_mode():
            out = self.model.generate(
                **ids,
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
                streamer=FirstToken() if first_token else None,
            )
        if self.device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        return int(out.shape[1] - ids["input_ids"].shape[1]), seconds, (first[0] if first else None)


def _body(i: int, tokens: int, stream: bool) -> dict[str, Any]:
    return {
        "model": "tiny-mistral",
        "messages": _messages(i),
        "temperature": 0,
        "max_tokens": tokens,
        "min_tokens": tokens,
        "stream": stream,
    }


def server_run(client: httpx.Client, i: int, tokens: int) -> tuple[int, float]:
    start = time.perf_counter()
    r = client.post("/v1/chat/completions", json=_body(i, tokens, False))
    seconds = time.perf_counter() - start
    r.raise_for_status()
    return int(r.json()["usage"]["completion_tokens"]), seconds


def server_stream(client: httpx.Client, i: int, tokens: int) -> tuple[float, float, int]:
    """(first-token seconds, total seconds, content chunks)."""
    start = time.perf_counter()
    first = None
    chunks = 0
    body = {**_body(i, tokens, True)}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if obj["choices"] and obj["choices"][0]["delta"].get("content"):
                chunks += 1
                if first is None:
                    first = time.perf_counter() - start
    return (first if first is not None else float("nan")), time.perf_counter() - start, chunks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per reply (min = max)")
    parser.add_argument("--requests", type=int, default=8, help="requests per mode per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-record", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    wait_for_quiet()

    model = tiny_model_dir()
    tmp = Path(tempfile.mkdtemp(prefix="ipo-bench-inference-"))
    models = models_dir_with(model, tmp)
    port = free_port()
    env = {
        **os.environ,
        "IPO_MODELS_DIR": str(models),
        "IPO_ADAPTERS_DIR": str(tmp / "adapters"),
        "IPO_DEVICE": args.device,
        "IPO_LOG_LEVEL": "WARNING",
        "IPO_INFERENCE_MAX_TOKENS": str(max(2048, args.tokens)),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "ipo_cli.main", "inference", "--port", str(port)],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/health", [proc], timeout=300)
        reference = Reference(model, args.device)
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600)
        reference.run(0, 8)  # warm-up both sides
        server_run(client, 0, 8)
        a_tok = a_s = b_tok = b_s = 0.0
        per_round: list[float] = []
        for _ in range(args.rounds):
            rt = rs = st = ss = 0.0
            for i in range(args.requests):
                n, s, _ = reference.run(i, args.tokens)
                rt, rs = rt + n, rs + s
                n2, s2 = server_run(client, i, args.tokens)
                st, ss = st + n2, ss + s2
            per_round.append((st / ss) / (rt / rs))
            a_tok, a_s, b_tok, b_s = a_tok + rt, a_s + rs, b_tok + st, b_s + ss
        firsts, ref_firsts, stream_rates = [], [], []
        for i in range(args.requests):
            f, total, _chunks = server_stream(client, i, args.tokens)
            firsts.append(f)
            stream_rates.append(args.tokens / total)
            ref_firsts.append(reference.run(i, args.tokens, first_token=True)[2] or float("nan"))
        client.close()
    finally:
        stop_group(proc, timeout=30)

    a_rate, b_rate = a_tok / a_s, b_tok / b_s
    ratio = b_rate / a_rate
    met = "met" if ratio >= TARGET else "missed"
    cells = {
        "variant": f"tiny-mistral on {args.device}, greedy, {args.tokens} new tokens x {args.requests} requests "
        f"x {args.rounds} rounds",
        "(a) generate loop": f"{a_rate:.0f} tok/s ({int(a_tok)} tok in {a_s:.1f}s); first token p50 "
        f"{pct(ref_firsts, 50) * 1000:.1f} ms",
        "(b) inference server": f"{b_rate:.0f} tok/s ({int(b_tok)} tok in {b_s:.1f}s, HTTP included)",
        "(c) streamed": f"first token p50 {pct(firsts, 50) * 1000:.1f} ms, p90 {pct(firsts, 90) * 1000:.1f} ms; "
        f"{statistics.median(stream_rates):.0f} tok/s median",
        "ratio": f"(b)/(a) tok/s = {ratio:.2f}x (per round {', '.join(f'{r:.2f}' for r in per_round)}; "
        f"target >= {TARGET}x: {met})",
    }
    if args.no_record:
        print(json.dumps(cells, indent=2))
    else:
        record("inference", f"inference {args.device} {args.tokens} {args.requests} {args.rounds}", cells)


if __name__ == "__main__":
    main()
