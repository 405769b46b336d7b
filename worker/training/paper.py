"""The illustrative bandit of Azar et al. 2023 ("A General Theoretical Paradigm to Understand Learning from
Human Preferences", arXiv 2310.12036), reproduced through the service's own trainer and loss code.

Setting (paper Sec. 5.1-5.2, IPO; Sec. 4.2 and 5.4 for DPO's failure): K actions y_1..y_K with no context,
a reference policy ``ref`` and a finite data set of preference pairs ``(y_w, y_l)``. IPO's empirical loss
(Eq. 17) is

    L(pi) = sum_pairs ( h(y_w, y_l) - 1/(2 tau) )^2,   h(y, y') = log( pi(y) ref(y') / (pi(y') ref(y)) ).

With ``u = log(pi / ref)`` (defined up to an additive constant: the softmax gauge), ``h(y_w, y_l) = u_w - u_l``
so IPO's optimum is a *linear least squares* problem: the normal equations are ``L u = c b`` with ``L`` the
graph Laplacian of the comparison multigraph (pair counts), ``b_y = wins(y) - losses(y)`` and
``c = 1/(2 tau)``. ``ipo_optimum`` solves them exactly (minimum-norm solution: zero mean of ``u`` on each
connected component of the comparison graph) in plain Python; then ``pi = ref * exp(u) / Z``.

``train_bandit`` learns the same policy with the service's trainer (``IpoDPOTrainer``, i.e. TRL's
``DPOTrainer._compute_loss`` with ``loss_type="ipo"`` or ``"sigmoid"`` for DPO): a tiny Mistral whose
next-token distribution after a fixed one-token prompt is ``softmax(W h)`` for a frozen hidden state ``h``
and a trainable ``lm_head`` ``W`` (full fine-tuning of the head, no LoRA: TRL refuses adapters on ``lm_head``,
and the bandit's policy *is* the head's logits). Each completion is exactly one action token (no EOS, so
TRL's per-token IPO normalisation divides by 1 and the log-prob is exactly the action's). The reference is
a frozen copy of the model with logits initialised to ``log(ref)``. With plain SGD the IPO loss is a convex
quadratic in the logits (the log-normaliser cancels in ``h``), so full-batch SGD converges geometrically
to the closed form. With DPO (the sigmoid loss) the same data drives ``pi(y1) -> 1``: the paper's point
that DPO ignores the KL regularisation when preferences are deterministic (Sec. 4.2).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

Pair = tuple[str, str]


def parse_prefs(spec: str) -> tuple[list[str], list[tuple[int, int]]]:
    """``"y1>y2,y2>y3"`` -> (actions in first-seen order, pairs as (winner, loser) indices)."""
    actions: list[str] = []
    pairs: list[tuple[int, int]] = []
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            continue
        parts = [p.strip() for p in item.split(">")]
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise ValueError(f"bad preference {item!r}: expected 'winner>loser'")
        if parts[0] == parts[1]:
            raise ValueError(f"bad preference {item!r}: an action cannot be preferred to itself")
        idx = []
        for name in parts:
            if name not in actions:
                actions.append(name)
            idx.append(actions.index(name))
        pairs.append((idx[0], idx[1]))
    if not pairs:
        raise ValueError("no preferences given")
    return actions, pairs


def parse_ref(spec: str | None, k: int) -> list[float]:
    """``"0.5,0.3,0.2"`` -> normalised probabilities (uniform when ``spec`` is None)."""
    if spec is None:
        return [1.0 / k] * k
    values = [float(v) for v in spec.split(",") if v.strip()]
    if len(values) != k:
        raise ValueError(f"--ref has {len(values)} values but the preferences name {k} actions")
    if any(not (v > 0 and math.isfinite(v)) for v in values):
        raise ValueError("--ref values must be positive")
    total = sum(values)
    return [v / total for v in values]


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting (small dense systems)."""
    n = len(b)
    m = [[*row, b[i]] for i, row in enumerate(a)]
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[piv][col]) < 1e-12:
            raise ValueError("singular system")
        m[col], m[piv] = m[piv], m[col]
        for r in range(n):
            if r != col and m[r][col] != 0.0:
                f = m[r][col] / m[col][col]
                for c in range(col, n + 1):
                    m[r][c] -= f * m[col][c]
    return [m[i][n] / m[i][i] for i in range(n)]


def _components(k: int, pairs: list[tuple[int, int]]) -> list[list[int]]:
    parent = list(range(k))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for w, lo in pairs:
        parent[find(w)] = find(lo)
    groups: dict[int, list[int]] = {}
    for i in range(k):
        groups.setdefault(find(i), []).append(i)
    return list(groups.values())


def ipo_log_ratios(k: int, pairs: list[tuple[int, int]], tau: float) -> list[float]:
    """``u = log(pi*/ref)`` minimising sum_pairs (u_w - u_l - 1/(2 tau))^2 (min-norm, zero mean per component)."""
    c = 1.0 / (2.0 * tau)
    lap = [[0.0] * k for _ in range(k)]
    b = [0.0] * k
    for w, lo in pairs:
        lap[w][w] += 1.0
        lap[lo][lo] += 1.0
        lap[w][lo] -= 1.0
        lap[lo][w] -= 1.0
        b[w] += c
        b[lo] -= c
    # L + sum_C (1/|C|) 1_C 1_C^T is invertible; its solution is L's pseudo-inverse solution (b sums to 0 on C).
    for comp in _components(k, pairs):
        for i in comp:
            for j in comp:
                lap[i][j] += 1.0 / len(comp)
    return _solve(lap, b)


def ipo_optimum(k: int, pairs: list[tuple[int, int]], tau: float, ref: list[float] | None = None) -> list[float]:
    """IPO's optimal policy over the K actions (paper Sec. 5, Eq. 17 minimised exactly)."""
    ref = ref or [1.0 / k] * k
    u = ipo_log_ratios(k, pairs, tau)
    logits = [math.log(r) + ui for r, ui in zip(ref, u, strict=True)]
    top = max(logits)
    ex = [math.exp(v - top) for v in logits]
    z = sum(ex)
    return [e / z for e in ex]


def ipo_pair_loss(policy_logps: tuple[float, float], ref_logps: tuple[float, float], beta: float) -> float:
    """IPO loss of one pair, plain Python: (log-ratio margin - 1/(2 beta))^2 (for cross-checks)."""
    h = (policy_logps[0] - ref_logps[0]) - (policy_logps[1] - ref_logps[1])
    return (h - 1.0 / (2.0 * beta)) ** 2


# --- training through the service's trainer -------------------------------------------------------------------

PAD, EOS, PROMPT = 0, 1, 2
"""Special token ids; action i is token ``3 + i``."""
N_SPECIAL = 3


@dataclass
class BanditResult:
    actions: list[str]
    ref: list[float]
    learned: list[float]
    optimum: list[float]
    loss_type: str
    tau: float
    steps: int
    seconds: float
    final_loss: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def max_abs_diff(self) -> float:
        return max(abs(a - b) for a, b in zip(self.learned, self.optimum, strict=True))

    def to_dict(self) -> dict[str, Any]:
        return {
            "loss": "ipo" if self.loss_type == "ipo" else "dpo",
            "tau": self.tau,
            "actions": self.actions,
            "reference": self.ref,
            "learned": self.learned,
            "ipo_optimum": self.optimum,
            "max_abs_diff": self.max_abs_diff,
            "steps": self.steps,
            "seconds": round(self.seconds, 2),
            "final_loss": self.final_loss,
        }


def _tokenizer(k: int) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "</s>": EOS, "<q>": PROMPT, **{f"a{i}": N_SPECIAL + i for i in range(k)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<pad>")


def _build_model(k: int, ref: list[float], seed: int) -> tuple[Any, Any]:
    """Tiny Mistral with a frozen backbone; returns (model, h) with logits(after <q>) = lm_head.weight @ h."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    config = MistralConfig(
        vocab_size=k + N_SPECIAL,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=4,
        max_position_embeddings=8,
        tie_word_embeddings=False,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=PROMPT,
    )
    model = MistralForCausalLM(config).float()
    for p in model.model.parameters():
        p.requires_grad_(False)
    model.eval()
    with torch.no_grad():
        h = model.model(input_ids=torch.tensor([[PROMPT]])).last_hidden_state[0, -1].clone()
        unit = h / h.dot(h)
        # ``ref`` are the actions' probabilities; the specials share what is left (~e^-30 each when nothing is).
        rest = max(1.0 - sum(ref), 0.0) / N_SPECIAL
        target = torch.full((k + N_SPECIAL,), math.log(rest) if rest > 1e-13 else -30.0)
        target[N_SPECIAL:] = torch.log(torch.tensor(ref, dtype=torch.float64)).float()
        model.lm_head.weight.copy_(target[:, None] * unit[None, :])
    return model, h


def _policy(model: Any, k: int) -> list[float]:
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[PROMPT]])).logits[0, -1].double()
        probs = torch.softmax(logits, dim=-1)[N_SPECIAL:]
    return [float(p) for p in probs]


def default_lr(pairs: list[tuple[int, int]], k: int, loss_type: str, tau: float, h_sq: float) -> float:
    """SGD step for the head: logits move by lr*|h|^2 times their gradient. IPO's mean loss has Hessian
    (2/n) L in the logits, ||L|| <= 2*max degree (Gershgorin), so a logit step of n/(4*maxdeg) is stable and
    fast; the sigmoid (DPO) loss has curvature <= beta^2/4 times the Laplacian's, so it gets a larger step."""
    deg = [0] * k
    for w, lo in pairs:
        deg[w] += 1
        deg[lo] += 1
    step = len(pairs) / (4.0 * max(deg))
    if loss_type != "ipo":
        step *= 8.0 / (tau * tau)
    return step / h_sq


def _trainer(
    model: Any,
    ref_model: Any,
    dataset: Any,
    k: int,
    out: str,
    loss_type: str,
    tau: float,
    lr: float,
    steps: int,
    batch_size: int,
    seed: int,
) -> Any:
    from transformers import PrinterCallback
    from trl import DPOConfig

    from worker.training.trainer import IpoDPOTrainer

    class BanditTrainer(IpoDPOTrainer):
        """Takes the pre-tokenised single-token completions as they are (TRL would append EOS to each)."""

        def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
            return dataset

    args = DPOConfig(
        output_dir=out,
        loss_type=[loss_type],
        beta=tau,
        learning_rate=lr,
        lr_scheduler_type="constant",
        optim="sgd",
        weight_decay=0.0,
        max_grad_norm=1e9,
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=1,
        max_length=None,
        logging_steps=steps,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        bf16=False,  # TRL defaults to bf16 autocast on CPU too; the bandit needs fp32 logits
        seed=seed,
        dataloader_num_workers=0,
    )
    trainer = BanditTrainer(
        model=model, ref_model=ref_model, args=args, train_dataset=dataset, processing_class=_tokenizer(k)
    )
    trainer.remove_callback(PrinterCallback)  # keep stdout for the table / JSON
    return trainer


def trl_pair_loss(
    policy_logps: tuple[float, float], ref_logps: tuple[float, float], beta: float, loss_type: str = "ipo"
) -> float:
    """The loss of one (chosen, rejected) pair as the service's trainer computes it (``IpoDPOTrainer.compute_loss``,
    i.e. TRL ``DPOTrainer._compute_loss``), for a policy and reference with the given action log-probabilities."""
    import tempfile

    import torch
    from datasets import Dataset

    model = _build_model(2, [math.exp(v) for v in policy_logps], 0)[0]
    ref_model = _build_model(2, [math.exp(v) for v in ref_logps], 0)[0]
    row = {"prompt_ids": [PROMPT], "chosen_ids": [N_SPECIAL], "rejected_ids": [N_SPECIAL + 1]}
    dataset = Dataset.from_list([row])
    with tempfile.TemporaryDirectory(prefix="ipo-paper-") as out:
        trainer = _trainer(model, ref_model, dataset, 2, out, loss_type, beta, 0.0, 1, 1, 0)
        batch = trainer.data_collator([row])
        with torch.no_grad():
            loss = trainer.compute_loss(trainer.model, batch)
    return float(loss)


def train_bandit(
    prefs: str,
    tau: float,
    ref: str | list[float] | None = None,
    loss: str = "ipo",
    steps: int = 100,
    seed: int = 0,
    lr: float | None = None,
) -> BanditResult:
    """Train the bandit policy with ``IpoDPOTrainer`` (TRL ``DPOTrainer``) full-batch; compare to the optimum."""
    import logging
    import tempfile

    import torch
    from datasets import Dataset

    if loss not in ("ipo", "dpo", "sigmoid"):
        raise ValueError(f"unknown loss {loss!r} (ipo or dpo)")
    loss_type = "ipo" if loss == "ipo" else "sigmoid"
    actions, pairs = parse_prefs(prefs)
    k = len(actions)
    ref_probs = ref if isinstance(ref, list) else parse_ref(ref, k)
    started = time.monotonic()
    for name in ("transformers", "trl", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)

    model, h = _build_model(k, ref_probs, seed)
    ref_model = _build_model(k, ref_probs, seed)[0]
    for p in ref_model.parameters():
        p.requires_grad_(False)
    dataset = Dataset.from_list(
        [{"prompt_ids": [PROMPT], "chosen_ids": [N_SPECIAL + w], "rejected_ids": [N_SPECIAL + lo]} for w, lo in pairs]
    )
    step_lr = lr if lr is not None else default_lr(pairs, k, loss_type, tau, float(h.dot(h)))
    with tempfile.TemporaryDirectory(prefix="ipo-paper-") as out:
        trainer = _trainer(model, ref_model, dataset, k, out, loss_type, tau, step_lr, steps, len(pairs), seed)
        trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return BanditResult(
        actions=actions,
        ref=ref_probs,
        learned=_policy(model, k),
        optimum=ipo_optimum(k, pairs, tau, ref_probs),
        loss_type=loss_type,
        tau=tau,
        steps=steps,
        seconds=time.monotonic() - started,
        final_loss=float(losses[-1]) if losses else None,
        extra={"lr": step_lr, "torch_threads": torch.get_num_threads()},
    )


def format_table(result: BanditResult) -> str:
    name = "IPO" if result.loss_type == "ipo" else "DPO"
    lines = [
        f"{name} bandit, tau={result.tau:g}, {result.steps} full-batch steps in {result.seconds:.1f}s",
        f"{'action':<10}{'reference':>12}{'learned':>12}{'IPO optimum':>14}{'|diff|':>10}",
    ]
    for a, r, lp, op in zip(result.actions, result.ref, result.learned, result.optimum, strict=True):
        lines.append(f"{a:<10}{r:>12.6f}{lp:>12.6f}{op:>14.6f}{abs(lp - op):>10.6f}")
    lines.append(f"max |learned - IPO optimum| = {result.max_abs_diff:.6f}")
    return "\n".join(lines)
