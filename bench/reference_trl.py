"""Reference: IPO + LoRA with TRL written the way the TRL docs show it, nothing tuned.

    python bench/reference_trl.py --model DIR --data train.jsonl --out DIR [--max-steps 40] [--device cpu|cuda]
                                  [--gradient-accumulation-steps 1] [--qlora]

Only the hyperparameters the benchmark pins are set (loss, beta, batch size, steps, learning rate,
max_length, seed, LoRA); everything else is DPOConfig's default (so gradient checkpointing is on and
bf16 is on for cuda and off for cpu, as in the project; ``--bf16 trl-default`` keeps DPOConfig's
bf16=True on CPU too, which runs bf16 autocast on CPUs without native bf16 and is several times
slower). ``logging_steps`` is set to 2 so the reported final loss averages the same window as the
project's trainer (which logs every 2 steps for a 40-step run). Writes a JSON
summary (``--json``): wall time, train time (``trainer.train()`` only, wall and CPU seconds of all threads),
TRL's token count, final loss,
and on CUDA the peak GPU memory (``torch.cuda.max_memory_allocated()``) and the GPU's name.

``--qlora`` (CUDA only; the Mistral-7B-shaped benchmark) loads the base model in 4 bits the way TRL's
PEFT integration guide shows QLoRA (docs/source/peft_integration.md, "QLoRA"):
``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
bnb_4bit_compute_dtype=torch.bfloat16)``, ``device_map="auto"``, the same ``peft_config`` LoRA; still
DPOConfig's defaults otherwise (its ``adamw_torch`` optimiser, gradient checkpointing on).
"""

from __future__ import annotations

import argparse
import json
import time

T_START = time.monotonic()


def peak_rss_bytes() -> int | None:
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--json", default=None)
    p.add_argument("--max-steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--gradient-accumulation-steps", type=int, default=1)
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument(
        "--bf16",
        choices=["auto", "trl-default"],
        default="auto",
        help="auto: bf16 on cuda, fp32 on cpu (what the project does); trl-default: DPOConfig's bf16=True everywhere",
    )
    p.add_argument("--qlora", action="store_true", help="4-bit NF4 base model (bitsandbytes), as TRL's docs show QLoRA")
    a = p.parse_args()
    if a.qlora and a.device != "cuda":
        p.error("--qlora needs --device cuda (bitsandbytes 4-bit)")

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    with open(a.data, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if a.qlora:
        from transformers import BitsAndBytesConfig

        bnb_config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        model = AutoModelForCausalLM.from_pretrained(a.model, quantization_config=bnb_config, device_map="auto")
    else:
        model = AutoModelForCausalLM.from_pretrained(a.model)
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    args = DPOConfig(
        output_dir=a.out,
        loss_type="ipo",
        beta=a.beta,
        per_device_train_batch_size=a.batch_size,
        gradient_accumulation_steps=a.gradient_accumulation_steps,
        max_steps=a.max_steps,
        learning_rate=a.learning_rate,
        max_length=a.max_length,
        seed=a.seed,
        logging_steps=2,
        report_to=[],
        use_cpu=a.device == "cpu",
        **({} if a.bf16 == "trl-default" else {"bf16": a.device == "cuda"}),
    )
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=16,
            lora_alpha=64,
            lora_dropout=0.1,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            task_type="CAUSAL_LM",
        ),
    )
    t0, c0 = time.monotonic(), time.process_time()
    trainer.train()
    train_s, train_cpu_s = time.monotonic() - t0, time.process_time() - c0
    trainer.save_model(a.out)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    tokens = [h["num_tokens"] for h in trainer.state.log_history if "num_tokens" in h]
    summary = {
        "wall_s": time.monotonic() - T_START,
        "train_s": train_s,
        "train_cpu_s": train_cpu_s,
        "peak_rss_bytes": peak_rss_bytes(),  # VmHWM: this process since exec (measurement only)
        "final_loss": losses[-1] if losses else None,
        "trl_num_tokens": tokens[-1] if tokens else None,
        "steps": trainer.state.global_step,
        "bf16": args.bf16,
        "gradient_checkpointing": args.gradient_checkpointing,
        "quantization": "nf4" if a.qlora else "none",
        "optim": str(getattr(args.optim, "value", args.optim)),
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if a.device == "cuda" else None,
        "peak_gpu_reserved_bytes": torch.cuda.max_memory_reserved() if a.device == "cuda" else None,
        "gpu_name": torch.cuda.get_device_name(0) if a.device == "cuda" else None,
    }
    print(json.dumps(summary))
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(summary, f)


if __name__ == "__main__":
    main()
