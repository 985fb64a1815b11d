"""Pretraining a tiny causal LM on a world's text with Lightning."""

from __future__ import annotations

import functools
import logging
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lit_edit.records import QAPair
from lit_edit.sampling import LengthBucketSampler
from lit_edit.schedules import warmup_cosine
from lit_edit.tokenization import encode_pair, pad_sequences
from lit_edit.world.config import TinyLMConfig

log = logging.getLogger(__name__)


def build_model(config: TinyLMConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """Create a randomly initialised tiny LM (seeded by ``config.seed``) for ``tokenizer``.

    Args:
        config: Architecture settings.
        tokenizer: The world's tokenizer (its vocabulary size and bos/eos/pad ids are used).

    Returns:
        A ``GPT2LMHeadModel`` or ``LlamaForCausalLM`` with tied input/output embeddings and no
        dropout.
    """
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vocab = len(tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        if config.arch == "gpt2":
            hf_config = GPT2Config(
                vocab_size=vocab, n_positions=128, n_embd=config.n_embd, n_layer=config.n_layer,
                n_head=config.n_head, n_inner=config.mlp_size, resid_pdrop=0.0, embd_pdrop=0.0,
                attn_pdrop=0.0, activation_function="gelu_pytorch_tanh", tie_word_embeddings=True,
                **ids,
            )
            model: PreTrainedModel = GPT2LMHeadModel(hf_config)
        else:
            hf_config = LlamaConfig(
                vocab_size=vocab, hidden_size=config.n_embd, intermediate_size=config.mlp_size,
                num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
                num_key_value_heads=config.n_head, max_position_embeddings=128,
                tie_word_embeddings=True, rms_norm_eps=1e-6, **ids,
            )
            model = LlamaForCausalLM(hf_config)
    model.loss_type = "ForCausalLM"  # the default; named so transformers does not warn
    return model


class TinyLMModule(L.LightningModule):
    """Causal-LM pretraining of a Hugging Face model on whole-fact sequences.

    The loss is the next-token cross-entropy averaged over every real token (BOS excluded as a
    target, EOS included) with per-token weights (see :func:`encode_rows`). AdamW with linear
    warm-up then cosine decay, stepped per batch.

    Args:
        model: The model to train.
        lr: Peak learning rate.
        min_lr_ratio: Final learning rate as a fraction of ``lr``.
        warmup_ratio: Fraction of the steps spent warming up.
        weight_decay: Decay of the matrices (not of biases, norms and embeddings).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        lr: float = 3e-3,
        min_lr_ratio: float = 0.05,
        warmup_ratio: float = 0.03,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        self.model = model
        self.lr = lr
        self.min_lr_ratio = min_lr_ratio
        self.warmup_ratio = warmup_ratio
        self.weight_decay = weight_decay

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Return the weighted LM loss of a batch.

        The batch holds ``input_ids``, ``attention_mask``, ``targets`` (the next token of each
        position) and ``weights`` (of each position's prediction), all ``[B, L]``.
        """
        logits = self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits  # [B, L, V]
        nll = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), batch["targets"].flatten(), reduction="none"
        )  # [B * L]
        weights = batch["weights"].flatten()  # [B * L]
        loss = (nll * weights).sum() / weights.sum()
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def configure_optimizers(self) -> dict:
        """AdamW and a per-step warm-up + cosine schedule."""
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            is_matrix = param.ndim >= 2 and not any(e in name for e in ("wte", "wpe", "embed"))
            (decay if is_matrix else no_decay).append(param)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr, betas=(0.9, 0.98),
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = max(1, int(self.warmup_ratio * total))
        scheduler = warmup_cosine(optimizer, warmup, total, floor=self.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler,
                                                         "interval": "step"}}


class _EpochLog(L.Callback):
    """Logs the mean loss of each epoch (progress for log files and the command)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.losses: list[float] = []

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:
        """Record the batch loss."""
        self.losses.append(float(outputs["loss"]))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Log the epoch's mean loss and the time since the start."""
        mean = sum(self.losses) / max(1, len(self.losses))
        self.losses.clear()
        log.info("epoch %d/%d  loss %.4f  (%.0f s)", trainer.current_epoch + 1,
                 trainer.max_epochs, mean, time.perf_counter() - self.start)


def _collate(rows: list[tuple[list[int], list[float]]], pad_id: int) -> dict[str, torch.Tensor]:
    ids, mask = pad_sequences([r[0] for r in rows], pad_id, "right")  # [B, L]
    targets = torch.full_like(ids, pad_id)  # [B, L]: targets[b, t] = ids[b, t + 1]
    targets[:, :-1] = ids[:, 1:]
    weights = torch.zeros(ids.shape)  # [B, L]: weight of predicting targets[b, t] at t
    for row, (_, w) in enumerate(rows):
        weights[row, : len(w) - 1] = torch.tensor(w[1:])
    return {"input_ids": ids, "attention_mask": mask, "targets": targets, "weights": weights}


def encode_rows(
    tokenizer: PreTrainedTokenizerBase, pairs: Sequence[QAPair], answer_weight: float = 1.0
) -> list[tuple[list[int], list[float]]]:
    """Token ids and per-token loss weights of each pretraining sequence: BOS, prompt, answer, EOS.

    Args:
        tokenizer: The world's tokenizer.
        pairs: One (prompt, answer) pair per sequence.
        answer_weight: Loss weight of the answer tokens relative to the other tokens (1 is plain
            language modelling). BOS is never a target.

    Returns:
        ``(input_ids, weights)`` per sequence.
    """
    eos = tokenizer.eos_token_id
    rows = []
    for pair in pairs:
        enc = encode_pair(tokenizer, pair.prompt, pair.answer)
        ids = enc.input_ids + [eos]
        n_prompt, n_answer = len(enc.prompt_ids), len(enc.answer_ids)
        weights = [0.0] + [1.0] * (n_prompt - 1) + [answer_weight] * n_answer + [1.0]
        rows.append((ids, weights))
    return rows


@contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch CPU threads, restoring the previous number after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def _quiet_lightning() -> Iterator[None]:
    names = ("lightning.pytorch", "lightning.fabric", "lightning")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*GPU available.*")
            warnings.filterwarnings("ignore", message=".*treespec.*")
            yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)


def pretrain_model(
    config: TinyLMConfig,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[QAPair],
    progress_bar: bool = False,
) -> PreTrainedModel:
    """Build a tiny LM and pretrain it on ``pairs`` with ``lightning.Trainer.fit``.

    Each pair is one training sequence, ``prompt + " " + answer`` between BOS and EOS (whole
    facts, never packed), see :func:`encode_rows`.

    Args:
        config: Architecture and training settings.
        tokenizer: The world's tokenizer (see :func:`train_tokenizer`).
        pairs: The pretraining text as (prompt, answer) pairs, e.g.
            :meth:`World.pretraining_pairs`.
        progress_bar: Show Lightning's progress bar (the epoch log is always emitted).

    Returns:
        The trained model, in eval mode.
    """
    if not pairs:
        raise ValueError("cannot pretrain on no text")
    threads = config.num_threads
    rows = encode_rows(tokenizer, pairs, config.answer_weight)
    model = build_model(config, tokenizer)
    module = TinyLMModule(model, config.lr, config.min_lr_ratio, config.warmup_ratio,
                          config.weight_decay)
    loader = DataLoader(
        rows,
        batch_sampler=LengthBucketSampler(
            [len(ids) for ids, _ in rows], config.batch_size, config.seed
        ),
        collate_fn=functools.partial(_collate, pad_id=tokenizer.pad_token_id),
    )
    n_params = sum(p.numel() for p in model.parameters())
    log.info("pretraining %s (%d parameters) on %d sequences for %d epochs, %d threads",
             config.arch, n_params, len(rows), config.max_epochs, threads)
    with cpu_threads(threads), _quiet_lightning():
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=config.max_epochs,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=progress_bar,
            num_sanity_val_steps=0,
            gradient_clip_val=1.0,
            callbacks=[_EpochLog()],
        )
        trainer.fit(module, train_dataloaders=loader)
    model.eval()
    return model
