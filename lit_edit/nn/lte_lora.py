"""LoRA adapters for LTE's alignment (through peft): the paper's q/v targets per architecture."""

from __future__ import annotations

from torch import nn


def default_lora_targets(model: nn.Module) -> list[str]:
    """The paper's LoRA targets (query and value projections) under ``model``'s module names.

    Architectures with a fused query/key/value matrix (GPT-2's ``c_attn``, NeoX's
    ``query_key_value``) get that matrix: LoRA on it adapts q, k and v together.

    Raises:
        ValueError: for an architecture with none of the known names.
    """
    known = (
        ("q_proj", "v_proj"),  # LLaMA, Mistral, Qwen2, OPT
        ("query", "value"),  # BERT-style
        ("c_attn",),  # GPT-2 and Qwen-1: q, k and v are one fused matrix
        ("query_key_value",),  # GPT-NeoX, Falcon, BLOOM: fused
    )
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for names in known:
        if all(n in leaves for n in names):
            return list(names)
    raise ValueError(
        f"no known query/value projection in {type(model).__name__}: set lora_target_modules"
    )


def with_lora(
    model: nn.Module,
    rank: int,
    alpha: int,
    dropout: float,
    targets: list[str] | None,
    to_save: list[str] | None,
) -> nn.Module:
    """``model`` wrapped with LoRA adapters (peft); its own weights stay frozen.

    Args:
        model: A causal LM.
        rank: LoRA rank r.
        alpha: LoRA scaling alpha.
        dropout: Dropout on the LoRA input.
        targets: Module names to adapt (default: :func:`default_lora_targets`).
        to_save: Modules trained fully beside the adapters (e.g. ``["wpe"]``).
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets or default_lora_targets(model),
        modules_to_save=to_save,
        fan_in_fan_out=model.config.model_type == "gpt2",  # GPT-2's Conv1D is [in, out]
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)
