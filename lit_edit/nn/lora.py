"""LoRA adapters through peft: settings, and the q/v targets of LTE's paper per architecture."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class LoraSettings:
    """Low-rank adapters (peft) instead of full fine-tuning.

    Args:
        rank: LoRA rank r.
        alpha: LoRA scaling alpha.
        dropout: Dropout on the LoRA input.
        target_modules: Module names to adapt (default: the query and value projections
            under the architecture's names, see :func:`default_lora_targets`).
        modules_to_save: Modules trained fully beside the adapters (e.g. ``["wpe"]``).
    """

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] | None = None
    modules_to_save: list[str] | None = None


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
        f"no known query/value projection in {type(model).__name__}: set lora.target_modules"
    )


def with_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """``model`` wrapped with LoRA adapters (peft); its own weights stay frozen.

    Args:
        model: A causal LM.
        settings: Rank, alpha, dropout, targets and fully trained modules.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules or default_lora_targets(model)),
        modules_to_save=settings.modules_to_save,
        fan_in_fan_out=model.config.model_type == "gpt2",  # GPT-2's Conv1D is [in, out]
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)
