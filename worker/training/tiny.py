"""Build the tiny Mistral-architecture chat model used by the embedded default, the demo and the tests.

Everything is made locally (nothing is downloaded): a byte-level BPE tokenizer trained with the
``tokenizers`` library on the demo corpus, a Zephyr-style chat template, a small ``MistralForCausalLM``
(grouped-query attention like Mistral 7B, a few million parameters) briefly pre-trained with a plain
causal-LM loss on dialogues that contain correct and wrong answers in equal measure, so it is a real
language model with about chance preference. Saved with ``save_pretrained`` (safetensors).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

from worker.training import demo_data
from worker.training.data import chat_token_ids

MODEL_NAME = "tiny-mistral"
BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

# Zephyr's template (HuggingFaceH4/zephyr-7b-beta): "<|role|>\n" + content + eos, one message a line.
# The generation prompt is exactly what precedes an assistant reply, so the rendered prompt is a token
# prefix of prompt + reply (tests/training/test_tiny.py checks it).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def build_tokenizer(corpus: list[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style: lossless, no unknown bytes) trained on ``corpus``."""
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [UNK, BOS, EOS, PAD, *ROLE_TOKENS]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[AddedToken(s, special=True, normalized=False) for s in specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(vocab_size: int, *, pad_id: int, bos_id: int, eos_id: int) -> MistralConfig:
    return MistralConfig(
        vocab_size=vocab_size,
        hidden_size=192,
        intermediate_size=512,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,  # grouped-query attention, as in Mistral 7B (32 query heads, 8 KV heads)
        head_dim=32,
        max_position_embeddings=512,
        sliding_window=None,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
    )


def _pretrain(
    model: MistralForCausalLM,
    sequences: list[list[int]],
    *,
    pad_id: int,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> float:
    """Plain causal-LM loss over whole dialogues, AdamW with cosine decay. Returns the last loss."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))),
    )
    model.train()
    loss_value = float("nan")
    for _ in range(steps):
        idx = torch.randint(len(sequences), (batch_size,), generator=gen).tolist()
        batch = [sequences[i] for i in idx]
        width = max(len(s) for s in batch)
        ids = torch.full((batch_size, width), pad_id, dtype=torch.long)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss_value = float(loss.detach())
    model.eval()
    return loss_value


def build_tiny_model(
    out_dir: str | Path,
    seed: int = 0,
    pretrain_steps: int = 450,
    *,
    batch_size: int = 64,
    lr: float = 3e-3,
) -> Path:
    """Build, pre-train and save the tiny model into ``out_dir`` (conventionally ``<models_dir>/tiny-mistral``).

    Returns the directory. Deterministic for a given seed (CPU).
    """
    out = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(demo_data.pretraining_corpus(seed))
    config = tiny_config(
        len(tokenizer),
        pad_id=tokenizer.pad_token_id,
        bos_id=tokenizer.bos_token_id,
        eos_id=tokenizer.eos_token_id,
    )
    model = MistralForCausalLM(config)
    sequences = [chat_token_ids(tokenizer, conv) for conv in demo_data.pretraining_conversations(seed)]
    if pretrain_steps > 0:
        _pretrain(
            model,
            sequences,
            pad_id=tokenizer.pad_token_id,
            steps=pretrain_steps,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
        )
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the tiny Mistral-architecture demo model.")
    parser.add_argument("--out", default=f"./var/models/{MODEL_NAME}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretrain-steps", type=int, default=450)
    args = parser.parse_args(argv)
    start = time.monotonic()
    path = build_tiny_model(args.out, seed=args.seed, pretrain_steps=args.pretrain_steps)
    print(f"built {path} in {time.monotonic() - start:.1f}s")


if __name__ == "__main__":
    main()
