"""The embedded inference server: an OpenAI-compatible ``/v1/chat/completions`` over one base model and its
LoRA adapters (PEFT multi-adapter, transformers ``generate``), in its own process.

The API (``app``) never imports this package (nor torch): it forwards chat completions here over HTTP
(``IPO_INFERENCE_URL``), speaking the same protocol as vLLM's OpenAI-compatible server, which can take its
place on GPU hosts. Run it with ``ipo inference`` (``ipo up`` starts it).
"""
