from __future__ import annotations

from typing import Any

import pytest

from contracts.method import Method
from worker.training.recipe import ZEPHYR_IPO, ConfigError, fit_max_length, plan_steps, preset_for, resolve_config

MISTRAL_7B: dict[str, Any] = {
    "model_type": "mistral",
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 32768,
}
TINY: dict[str, Any] = {**MISTRAL_7B, "hidden_size": 192, "num_hidden_layers": 3, "max_position_embeddings": 512}


def _method(**blocks: Any) -> Method:
    return Method.model_validate({"type": "ipo", "ipo": blocks})


def test_auto_on_cuda_is_the_seed_recipe() -> None:
    cfg = resolve_config(Method(), n_train_examples=1000, model_config_dict=MISTRAL_7B, device="cuda")
    assert cfg.loss_type == "ipo"
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == (16, 64, 0.1)
    assert cfg.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert cfg.quantization == "nf4" and cfg.double_quant and cfg.compute_dtype == "bfloat16"
    assert cfg.gradient_checkpointing and cfg.optim == "paged_adamw_8bit"
    assert cfg.lr_scheduler == "cosine" and cfg.warmup_ratio == 0.1
    assert cfg.beta == ZEPHYR_IPO["beta"] and cfg.learning_rate == ZEPHYR_IPO["learning_rate"]
    # 1000 examples / (4 * 4) per step, 1 epoch
    assert cfg.total_steps == 63
    resolved = cfg.resolved_dict()
    assert resolved["quantization"] == "nf4" and "auto" not in resolved.values()


def test_cpu_auto_is_plain_lora_fp32() -> None:
    cfg = resolve_config(Method(), n_train_examples=320, model_config_dict=TINY, device="cpu")
    assert cfg.quantization == "none" and cfg.compute_dtype == "float32"
    assert cfg.optim == "adamw_torch" and not cfg.gradient_checkpointing
    assert cfg.max_length <= 512


def test_explicit_values_win_and_dpo_uses_sigmoid() -> None:
    method = Method.model_validate(
        {
            "type": "dpo",
            "dpo": {"hyperparameters": {"beta": 0.3, "batch_size": 2, "n_epochs": 2, "learning_rate": 1e-4}},
        }
    )
    cfg = resolve_config(method, n_train_examples=10, model_config_dict=MISTRAL_7B, device="cuda")
    assert cfg.loss_type == "sigmoid" and cfg.beta == 0.3 and cfg.batch_size == 2
    assert cfg.total_steps == 2 * 2  # ceil(10 / (2 * 4)) * 2 epochs


def test_nf4_on_cpu_is_refused() -> None:
    with pytest.raises(ConfigError) as err:
        resolve_config(_method(lora={"quantization": "nf4"}), n_train_examples=10, model_config_dict=TINY, device="cpu")
    assert err.value.field == "lora.quantization"
    assert isinstance(err.value, ValueError)


def test_unknown_target_module_names_the_field() -> None:
    with pytest.raises(ConfigError) as err:
        resolve_config(
            _method(lora={"target_modules": ["q_proj", "attn.c_attn"]}),
            n_train_examples=10,
            model_config_dict=TINY,
            device="cpu",
        )
    assert err.value.field == "lora.target_modules"
    assert "attn.c_attn" in str(err.value)


def test_length_grouping_is_on_and_reference_precompute_needs_a_whole_epoch() -> None:
    full = resolve_config(Method(), n_train_examples=320, model_config_dict=TINY, device="cpu")
    assert full.group_by_length and full.precompute_ref_log_probs  # 3 epochs
    short = resolve_config(
        _method(hyperparameters={"max_steps": 10, "batch_size": 8}),
        n_train_examples=320,
        model_config_dict=TINY,
        device="cpu",
    )
    assert short.group_by_length and not short.precompute_ref_log_probs  # 80 of 320 pairs: per-step reference
    one_epoch = resolve_config(
        _method(hyperparameters={"max_steps": 40, "batch_size": 8}),
        n_train_examples=320,
        model_config_dict=TINY,
        device="cpu",
    )
    assert one_epoch.precompute_ref_log_probs


def test_attention_and_fused_kernels_follow_the_device_and_what_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    cpu = resolve_config(Method(), n_train_examples=10, model_config_dict=TINY, device="cpu")
    assert (cpu.attn_implementation, cpu.use_liger_kernel) == ("sdpa", False)
    installed = {"flash_attn", "liger_kernel"}
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name in installed else real(name))
    cuda = resolve_config(Method(), n_train_examples=10, model_config_dict=MISTRAL_7B, device="cuda")
    assert (cuda.attn_implementation, cuda.use_liger_kernel) == ("flash_attention_2", True)
    cpu = resolve_config(Method(), n_train_examples=10, model_config_dict=TINY, device="cpu")
    assert (cpu.attn_implementation, cpu.use_liger_kernel) == ("sdpa", False)  # CUDA-only kernels
    installed.clear()
    cuda = resolve_config(Method(), n_train_examples=10, model_config_dict=MISTRAL_7B, device="cuda")
    assert (cuda.attn_implementation, cuda.use_liger_kernel) == ("sdpa", False)


def test_step_plan_counts_optimiser_steps_and_spaces_saves_logs_and_evaluations() -> None:
    plan = plan_steps(
        n_train_examples=100,
        batch_size=4,
        gradient_accumulation_steps=2,
        n_epochs=3,
        max_steps=-1,
        checkpoint_every=None,
        has_validation=True,
    )
    assert plan.total_steps == 3 * 13  # ceil(100 / 8) per epoch
    assert plan.checkpoint_every == 39 // 4 and plan.eval_every == 39 // 4
    assert plan.logging_steps == 1  # 39 // 20
    assert plan.precompute_ref_log_probs
    capped = plan_steps(
        n_train_examples=100,
        batch_size=4,
        gradient_accumulation_steps=2,
        n_epochs=3,
        max_steps=5,
        checkpoint_every=2,
        has_validation=False,
    )
    assert (capped.total_steps, capped.checkpoint_every, capped.eval_every) == (5, 2, None)
    assert not capped.precompute_ref_log_probs  # 40 of 100 pairs: less than one pass


def test_presets_and_max_length_fit() -> None:
    assert preset_for(TINY)["learning_rate"] == 1.0e-3 and preset_for(TINY)["lora_r"] == ZEPHYR_IPO["lora_r"]
    assert preset_for(MISTRAL_7B) == ZEPHYR_IPO
    assert fit_max_length(1024, explicit=False, model_config_dict=TINY) == 512  # auto: capped at positions
    with pytest.raises(ConfigError) as err:
        fit_max_length(1024, explicit=True, model_config_dict=TINY)
    assert err.value.field == "hyperparameters.max_length"
    assert fit_max_length(4096, explicit=True, model_config_dict={}) == 4096  # positions unknown


@pytest.mark.parametrize(
    "config", [TINY, {"hidden_size": 4096, "num_hidden_layers": 32, "max_position_embeddings": 600}]
)
@pytest.mark.parametrize("requested", ["auto", 100])
def test_max_length_resolves_as_the_api_resolves_it(config: dict[str, Any], requested: Any) -> None:
    from contracts.max_length import resolve_max_length

    method = Method.model_validate({"type": "ipo", "ipo": {"hyperparameters": {"max_length": requested}}})
    cfg = resolve_config(method, n_train_examples=8, model_config_dict=config, device="cpu")
    assert cfg.max_length == resolve_max_length(requested, config)
