"""The peer's yardstick (../shared/PEER.md): a 4-layer GPT-2 and the ZsRE records it was timed on.

EasyEdit's figures in PEER.md were measured on one small GPT-2: 4 layers, n_embd 256, 4 heads,
128 positions, a 4096-token byte-level BPE trained on ZsRE text, tied embeddings, ``gelu_new``
(4.24M parameters), on the first records of ``zsre_mend_eval_portability_gpt4.json``. The
benchmarks time lit_edit on a model of exactly that shape (random weights, seeded: no figure
timed against the peer depends on what the model knows) and on the same records.

    from yardstick import yardstick_dir, zsre_records
    backbone = str(yardstick_dir())          # a directory any editor loads as its backbone
    records = zsre_records(200)

The model directory is built once and cached under ``$LIT_EDIT_CACHE/yardstick`` (default
``~/.cache/lit_edit/yardstick``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".." / "shared" / "data" / "zsre"
EVAL_FILE = DATA / "zsre_mend_eval_portability_gpt4.json"
TRAIN_FILE = DATA / "zsre_mend_train-1k.json"
SHAPE = {"n_layer": 4, "n_embd": 256, "n_head": 4, "n_positions": 128, "vocab_size": 4096}


def _require_data() -> None:
    if not EVAL_FILE.is_file() or not TRAIN_FILE.is_file():
        raise SystemExit(
            f"the yardstick needs the shared ZsRE files ({EVAL_FILE} and {TRAIN_FILE}); "
            "they are not here"
        )


def zsre_records(n: int = 200) -> list:
    """The first ``n`` records of the ZsRE eval slice (the peer's evaluation and edit set)."""
    from lit_edit.data import read_records

    _require_data()
    return read_records(EVAL_FILE).records[:n]


def zsre_train_records() -> list:
    """The valid records of the ZsRE train slice (998: the peer's training set)."""
    from lit_edit.data import read_records

    _require_data()
    return read_records(TRAIN_FILE, skip_invalid=True).records


def _texts() -> list[str]:
    """The ZsRE text the yardstick tokenizer is trained on (both slices, every field)."""
    texts = []
    for path in (EVAL_FILE, TRAIN_FILE):
        for row in json.loads(path.read_text(encoding="utf-8")):
            for key in ("src", "rephrase", "alt", "loc", "loc_ans", "pred"):
                if isinstance(row.get(key), str):
                    texts.append(row[key])
            texts.extend(a for a in row.get("answers", []) if isinstance(a, str))
    return texts


def yardstick_dir(seed: int = 0) -> Path:
    """A saved yardstick-shaped GPT-2 and its tokenizer (built once, then cached).

    Args:
        seed: Seed of the random weights.

    Returns:
        A directory loadable with ``from_pretrained`` (an editor's ``backbone``).
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    root = Path(os.environ.get("LIT_EDIT_CACHE") or Path.home() / ".cache" / "lit_edit")
    out = root / "yardstick" / f"gpt2-4x256-seed{seed}"
    if (out / "done").is_file():
        return out
    _require_data()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=SHAPE["vocab_size"], special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_texts(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        pad_token="<|endoftext|>", clean_up_tokenization_spaces=False, model_max_length=128,
    )
    eos = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=SHAPE["vocab_size"], n_positions=SHAPE["n_positions"],
        n_embd=SHAPE["n_embd"], n_layer=SHAPE["n_layer"], n_head=SHAPE["n_head"],
        activation_function="gelu_new", tie_word_embeddings=True,
        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "done").write_text(json.dumps({"parameters": model.num_parameters(), **SHAPE}) + "\n")
    return out


if __name__ == "__main__":
    path = yardstick_dir()
    print(path, json.loads((path / "done").read_text()))
