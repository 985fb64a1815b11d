"""LTEEditor on the TinyFacts model: loss mask, LoRA, memory checkpointing, real entry points."""

import json
import os
from pathlib import Path

import pytest
import torch

from lit_edit.cli import LitEditCLI, evaluate_main, train_main
from lit_edit.methods.lte import LTEEditor, default_lora_targets
from lit_edit.nn.lora import LoraSettings
from lit_edit.nn.scope import ScopeSettings
from lit_edit.records import EditRecord, QAPair
from lit_edit.tokenization import IGNORE_INDEX

BACKBONE = os.environ.get("LIT_EDIT_TEST_BACKBONE", "tinyfacts")
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "lte"


@pytest.fixture(scope="module")
def editor():
    return LTEEditor(backbone=BACKBONE, retriever="hashing")


def test_loss_mask_covers_only_the_answer_and_eos(editor):
    pairs = [QAPair("Where was Ann born?", "Paris"), QAPair("A longer question about x?", "B C")]
    batch = editor.encode_samples(pairs)
    tok = editor.tokenizer
    for row, pair in enumerate(pairs):
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        mask = batch["attention_mask"][row].bool()
        scored = labels != IGNORE_INDEX
        assert torch.equal(labels[scored], ids[scored])
        assert not (scored & ~mask).any()  # padding is never a label
        assert labels[scored][-1] == tok.eos_token_id
        assert tok.decode(labels[scored][:-1]) == " " + pair.answer
        n_prompt = int(mask.sum()) - int(scored.sum())
        assert tok.decode(ids[:n_prompt], skip_special_tokens=True) == pair.prompt
        assert not scored[:n_prompt].any()
    assert batch["attention_mask"][0, -1] == 0 or batch["attention_mask"][1, -1] == 0  # right pad


def test_lora_trains_adapters_only_and_checkpoints_them_alone():
    lora = LTEEditor(backbone=BACKBONE, lora=LoraSettings(), lr=1e-2, retriever="hashing")
    assert default_lora_targets(lora.model.get_base_model()) == ["c_attn"]
    state = lora.state_dict()
    base = {k: v.clone() for k, v in state.items() if k.startswith("model.") and "lora_" not in k}
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    batch = lora.encode_samples([QAPair("Where was Ann born?", "Paris")] * 4)
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    lora.train()
    for _ in range(3):
        loss, _ = lora._loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = lora.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in base.items())  # base weights untouched
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in lora.named_parameters()
               if "lora_B" in n)
    checkpoint = {"state_dict": dict(after)}
    lora.on_save_checkpoint(checkpoint)
    kept = [k for k in checkpoint["state_dict"] if k.startswith("model.")]
    assert kept and all("lora_" in k for k in kept)


def test_memory_is_in_the_state_dict_and_edits_restore(editor):
    records = [
        EditRecord("Where was Ann born?", "Paris", ground_truth=("Rome",)),
        EditRecord("Who employs Bob?", "Acme"),
    ]
    with editor.edit(records):
        state = {k: v for k, v in editor.state_dict().items() if not k.startswith("model.")}
        prompts = editor.contextualise(["Where was Ann born?", "Who employs Bob?"])
        assert "[Updated Information]:\nWhere was Ann born? Paris\n\n" in prompts[0]
        assert prompts[1].endswith("[Question]:\nWho employs Bob?")
        values = editor.record_values(records)
        assert values == [{"retrieval/hit@1": 1.0, "retrieval/hit@k": 1.0}] * 2
    assert len(editor.memory) == 0
    assert editor.contextualise(["Who employs Bob?"]) == ["Who employs Bob?"]  # bare pre-edit

    other = LTEEditor(backbone=BACKBONE, retriever="hashing")
    other.load_state_dict({**other.state_dict(), **state})
    assert other.memory.facts == [r.fact for r in records]


def test_int8_keys_retrieve_the_same_facts(editor):
    int8 = LTEEditor(backbone=BACKBONE, retriever="hashing", key_dtype="int8")
    records = [EditRecord(f"Where was Person{i} born?", f"Town{i}") for i in range(20)]
    queries = [f"Where was Person{i} born?" for i in range(20)] + ["Who employs Bob?"]
    with editor.edit(records), int8.edit(records):
        assert int8.memory.keys.dtype == torch.float32 and int8.memory._keys.dtype == torch.int8
        assert int8.contextualise(queries) == editor.contextualise(queries)


def _tiny_args(tmp_path, *extra):
    return [
        "--config", str(CONFIGS / "tinyfacts.yaml"),
        "--model.init_args.retriever", "hashing",
        "--data.init_args.encoder", "hashing",
        "--data.init_args.train_edits", "[]",
        "--data.init_args.edits.init_args.n_test", "12",
        "--data.init_args.edits.init_args.n_val", "6",
        "--data.init_args.edits.init_args.n_train", "30",
        "--data.init_args.edits.init_args.eval_batch_size", "6",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--trainer.enable_progress_bar", "false",
        *extra,
    ]


def test_short_fit_lowers_the_loss_and_evaluates_with_the_configs_settings(tmp_path, caplog):
    cli = train_main([
        "fit",
        *_tiny_args(tmp_path),
        "--data.init_args.unedited_answers", "dataset",
        "--data.init_args.max_replay", "32",  # the config's replay, a few pairs
        "--data.init_args.batch_size", "16",
        "--model.init_args.lr", "3e-3",
        "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "24",
        "--trainer.limit_val_batches", "2",
        "--trainer.val_check_interval", "1.0",
        "--trainer.callbacks.init_args.dirpath", str(tmp_path / "ckpt"),
    ])
    samples = cli.datamodule.samples["train"][:32]
    fresh = LTEEditor(backbone=BACKBONE, retriever="hashing", context_length=256)
    batch = fresh.encode_samples(samples)
    with torch.no_grad():
        before, _ = fresh._loss(batch)
        after, _ = cli.model.eval()._loss(batch)
    assert after < 0.8 * before
    ckpt = tmp_path / "ckpt" / "lte.ckpt"
    assert ckpt.exists()

    # evaluation-time settings given with --ckpt_path are used (Lightning's default would
    # silently replace them by the checkpoint's), and the difference is named
    caplog.set_level("WARNING", logger="lit_edit.cli")
    cli = evaluate_main([
        *_tiny_args(tmp_path),
        "--model.init_args.top_k", "2",
        "--evaluation.exact_match", "false",
        "--evaluation.results_dir", str(tmp_path / "results"),
        "--ckpt_path", str(ckpt),
    ])
    assert cli.model.top_k == 2 and cli.model.retriever.top_k == 2
    assert f"{ckpt} was trained with top_k=1; this run uses top_k=2" in caplog.text
    assert "trained with lr=0.003; this run uses lr=0.002" in caplog.text  # fit had --lr 3e-3
    assert "context_length=" not in caplog.text  # the same as in training: not reported
    trained = torch.load(ckpt, weights_only=True, map_location="cpu")["state_dict"]
    loaded = cli.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in trained.items() if isinstance(v, torch.Tensor))

    with pytest.raises(ValueError, match="holds a lit_edit.methods.LTEEditor"):
        evaluate_main([
            "--config", str(CONFIGS.parent / "ft" / "tinyfacts.yaml"),
            "--trainer.logger", "false",
            "--ckpt_path", str(ckpt),
        ])


def test_fit_trains_the_scope_head_without_changing_the_alignment(tmp_path, caplog):
    def fit(name, scope):
        return train_main([
            "fit",
            *_tiny_args(tmp_path / name),
            *(["--model.init_args.scope.steps", "50"] if scope else
              ["--model.init_args.scope", "null"]),
            "--data.init_args.unedited_answers", "dataset",
            "--data.init_args.max_replay", "16",
            "--trainer.max_epochs", "1",
            "--trainer.limit_train_batches", "3",
            "--trainer.limit_val_batches", "1",
            "--trainer.val_check_interval", "1.0",
            "--trainer.callbacks.init_args.dirpath", str(tmp_path / name),
        ])

    caplog.set_level("INFO", logger="lit_edit.methods.lte")
    with_scope, without = fit("on", True), fit("off", False)
    assert "scope head: " in caplog.text and "validation (" in caplog.text
    assert with_scope.model.scope_head.trained and without.model.scope_head is None
    on, off = with_scope.model.model.state_dict(), without.model.model.state_dict()
    assert on.keys() == off.keys() and all(torch.equal(on[k], off[k]) for k in on)
    saved = torch.load(tmp_path / "on" / "lte.ckpt", weights_only=True, map_location="cpu")
    hidden = with_scope.model.model.config.hidden_size  # the config's scope_layer states
    n_features = saved["state_dict"]["scope_head._extra_state"]["weights"]["w1"].shape[1]
    assert n_features == (2 * 256 + 1) + (2 * hidden + 1)  # hashing embeddings, then states

    common = ["--evaluation.exact_match", "false", "--data.init_args.edits.init_args.n_test", "6"]
    cli = evaluate_main([*_tiny_args(tmp_path / "eval"), *common,
                         "--ckpt_path", str(tmp_path / "on" / "lte.ckpt")])
    assert cli.model.scope_head.trained and "test/retrieval_hit@1" in cli.trainer.callback_metrics
    caplog.set_level("WARNING", logger="lit_edit.methods.lte")
    evaluate_main([*_tiny_args(tmp_path / "eval"), *common, "--model.init_args.scope", "null",
                   "--ckpt_path", str(tmp_path / "on" / "lte.ckpt")])
    assert "scope head is not used (scope: null)" in caplog.text
    with pytest.raises(ValueError, match="checkpoint has no trained scope head"):
        evaluate_main([*_tiny_args(tmp_path / "eval"), *common,
                       "--ckpt_path", str(tmp_path / "off" / "lte.ckpt")])
    with pytest.raises(SystemExit, match="LTEEditor must be trained before it is evaluated"):
        evaluate_main([*_tiny_args(tmp_path / "eval"), *common])
    with pytest.raises(RuntimeError, match="scope head is not trained"):
        evaluate_main([*_tiny_args(tmp_path / "eval"), *common, "--allow_untrained", "true"])


def test_evaluate_sequential_logs_retrieval_hits(tmp_path):
    cli = evaluate_main([
        *_tiny_args(tmp_path),
        "--allow_untrained", "true",
        "--model.init_args.scope", "null",
        "--config", str(CONFIGS / "eval_sequential_10.yaml"),
        "--evaluation.protocol.init_args.group_size", "4",
        "--evaluation.exact_match", "false",
        "--evaluation.results_dir", str(tmp_path / "results"),
    ])
    metrics = cli.trainer.callback_metrics
    assert 0.0 <= float(metrics["test/retrieval_hit@1"]) <= 1.0
    assert "test/reliability" in metrics and "test/locality" in metrics
    lines = (tmp_path / "results" / "records.jsonl").read_text().splitlines()
    rows = [json.loads(x) for x in lines]
    assert len(rows) == 12 and all("retrieval/hit@1" in r["post"] for r in rows)
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert "retrieval/hit@1" in summary["breakdown"]
    assert len(cli.model.memory) == 0


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_shipped_config_parses(name):
    args = ["--config", str(CONFIGS / name)]
    if name.startswith("eval_"):  # protocol overlays of the TinyFacts config
        args = ["--config", str(CONFIGS / "tinyfacts.yaml"), *args]
    with pytest.raises(SystemExit) as exit_info:
        LitEditCLI(args=["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)


@pytest.mark.parametrize("name", sorted(p.name for p in (CONFIGS / "variants").glob("*.yaml")))
def test_every_variant_overlay_parses(name, capsys):
    overlay = CONFIGS / "variants" / name
    args = ["--config", str(CONFIGS / "tinyfacts.yaml"), "--config", str(overlay)]
    with pytest.raises(SystemExit) as exit_info:
        LitEditCLI(args=["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert f"checkpoints/lte/{name.removesuffix('.yaml').replace('_', '-')}" in printed


def test_replay_adds_a_seeded_sample_of_the_pretraining_pairs_to_training_only():
    from lit_edit.data import TinyFactsDataModule
    from lit_edit.data.lte_datamodule import LTEDataModule
    from lit_edit.data.tinyfacts import load_tinyfacts_world

    pretraining = load_tinyfacts_world(BACKBONE).pretraining_pairs()

    def module(**kw):
        edits = TinyFactsDataModule(world=BACKBONE, n_train=10, n_val=2, n_test=2)
        return LTEDataModule(edits, encoder="hashing", replay=BACKBONE, **kw)

    dm = module(max_replay=40)
    dm.setup("fit")
    replayed = dm.samples["train"][-40:]
    assert len(set(replayed)) == 40 and set(replayed) <= set(pretraining)
    assert not set(dm.samples["val"]) & set(replayed)  # validation is not replayed
    plain = LTEDataModule(
        TinyFactsDataModule(world=BACKBONE, n_train=10, n_val=2, n_test=2), encoder="hashing"
    )
    plain.setup("fit")
    assert dm.samples["train"][:-40] == plain.samples["train"]
    assert module(max_replay=40).replay_samples() == replayed  # seeded
    assert module(max_replay=40, seed=1).replay_samples() != replayed
    assert module().replay_samples() == pretraining  # all of them, in order


def test_replay_from_a_conversations_file_and_a_clear_error_for_anything_else(tmp_path):
    from lit_edit.data import TinyFactsDataModule
    from lit_edit.data.lte_datamodule import LTEDataModule

    path = tmp_path / "known.json"
    path.write_text(json.dumps([
        {"id": str(i), "conversations": [
            {"from": "human", "value": f"Question {i}?"}, {"from": "gpt", "value": f"Answer {i}"},
        ]}
        for i in range(5)
    ]))

    def module(replay, **kw):
        edits = TinyFactsDataModule(world=BACKBONE, n_train=10, n_val=2, n_test=2)
        return LTEDataModule(edits, encoder="hashing", replay=replay, **kw)

    want = [QAPair(f"Question {i}?", f"Answer {i}") for i in range(5)]
    assert module(str(path)).replay_samples() == want
    assert set(module(str(path), max_replay=2).replay_samples()) < set(want)
    with pytest.raises(ValueError, match="replay='no-such-model' is neither a conversations file"):
        module("no-such-model").replay_samples()


def test_the_editor_and_its_data_are_connected_explicitly_not_through_the_trainer(editor):
    from lit_edit.data import TinyFactsDataModule
    from lit_edit.data.lte_datamodule import LTEDataModule
    from lit_edit.links import connect

    def module():
        edits = TinyFactsDataModule(world=BACKBONE, n_train=4, n_val=2, n_test=2)
        return LTEDataModule(edits, encoder="hashing", unedited_answers="model")

    alone = module()
    with pytest.raises(ValueError, match=r"lit_edit.links.connect\(editor, data\)"):
        alone.setup("fit")

    class Answerer:
        asked: list[str] = []

        def unedited_answers(self, questions, max_new_tokens=16):
            self.asked.extend(questions)
            return ["Before"] * len(questions)

    answerer, dm = Answerer(), module()
    connect(answerer, dm)
    dm.setup("fit")
    twins = [s for s in dm.samples["train"] if s.prompt in answerer.asked]
    assert answerer.asked and twins and all(s.answer == "Before" for s in twins)

    scoped = LTEEditor(backbone=BACKBONE, retriever="hashing", scope=ScopeSettings())
    with pytest.raises(ValueError, match="handed over by train.py"):
        scoped.fit_scope()
    connect(scoped, dm)
    assert scoped._records_of("train") == dm.edit_records("train")
