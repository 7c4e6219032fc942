"""Stage 04: DPO learns a separable preference, keeps one copy of the base weights with LoRA, compares a
continued adapter with its own starting weights, and writes a checkpoint with the reward metrics logged."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from utils.chat_data import PreferencePair
from utils.checkpoint import adapter_base_path, load_model
from utils.finetune import (
    DPOSettings,
    StageLogger,
    build_dpo_trainer,
    load_adapter_for_training,
    load_base_model,
    save_checkpoint,
)
from utils.metrics import read_metrics
from utils.templates import apply_template, load_template_name

ROOT = Path(__file__).resolve().parents[1]
GOOD, BAD = "Yes, here is the answer.", "No. Go away."


def toy_pairs(start: int, count: int) -> list[PreferencePair]:
    """Always prefer the polite reply: separable from the reply text alone, whatever the question."""
    return [PreferencePair([{"role": "user", "content": f"Question number {i}: can you help?"}],
                           [{"role": "assistant", "content": GOOD}], [{"role": "assistant", "content": BAD}])
            for i in range(start, start + count)]


def settings(**changes) -> DPOSettings:
    values = dict(learning_rate=5e-3, max_steps=12, batch_size=4, gradient_accumulation_steps=1, logging_steps=4,
                  warmup_ratio=0.0, lr_scheduler_type="constant", eval_fraction=0.0)
    return DPOSettings(**{**values, **changes})


def test_dpo_with_lora_learns_the_preference_with_one_copy_of_the_weights(micro_checkpoint, tokenizer, tmp_path):
    apply_template(tokenizer, "chatml")
    model = load_base_model(micro_checkpoint)
    base_numel = sum(p.numel() for p in model.parameters())
    trainer = build_dpo_trainer(model, tokenizer, toy_pairs(0, 32), toy_pairs(100, 8), settings(), tmp_path,
                                StageLogger("dpo", tmp_path / "metrics.jsonl"), max_length=64)
    assert trainer.ref_model is None  # the reference is the same model with its adapter disabled
    assert sum(p.numel() for n, p in trainer.model.named_parameters() if "lora_" not in n) == base_numel
    assert trainer.evaluate()["eval_rewards/accuracies"] == 0.0  # policy == reference: every reward is 0
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_rewards/accuracies"] > 0.9 and after["eval_rewards/margins"] > 0
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["event"] == "train"]
    wanted = {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"}
    assert rows and all(wanted <= set(r) for r in rows)


@pytest.fixture(scope="module")
def sft_adapter(micro_checkpoint, tmp_path_factory) -> Path:
    """An SFT-stage adapter (chat template) whose weights really change the model, saved like 03_sft saves it."""
    from peft import LoraConfig, get_peft_model

    from utils.tokenizer import load_tokenizer

    torch.manual_seed(0)
    model = get_peft_model(load_base_model(micro_checkpoint),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    tokenizer = load_tokenizer(micro_checkpoint)
    apply_template(tokenizer, "chat")
    stage = tmp_path_factory.mktemp("sft") / "micro"
    save_checkpoint(model, tokenizer, stage / "final", "chat", {"stage": "sft"}, base_model=micro_checkpoint)
    (stage / "latest").write_text("final\n")
    return stage


def test_continued_adapter_is_compared_with_its_own_starting_weights(sft_adapter, tokenizer, tmp_path):
    apply_template(tokenizer, "chat")
    model = load_adapter_for_training(sft_adapter / "final")
    trainer = build_dpo_trainer(model, tokenizer, toy_pairs(0, 8), toy_pairs(100, 4), settings(max_steps=2),
                                tmp_path, StageLogger("dpo", tmp_path / "metrics.jsonl"), max_length=64)
    assert trainer.ref_model is None and "ref" in trainer.model.peft_config
    before = trainer.evaluate()
    # with the adapter disabled instead, the reference would be the base model and these would not be 0
    assert before["eval_rewards/chosen"] == 0.0 and before["eval_rewards/rejected"] == 0.0
    reference = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if ".ref." in n}
    trainer.train()
    assert all(torch.equal(p, reference[n]) for n, p in trainer.model.named_parameters() if ".ref." in n)


def test_full_dpo_uses_a_frozen_reference_copy(micro_checkpoint, tokenizer, tmp_path):
    apply_template(tokenizer, "chatml")
    model = load_base_model(micro_checkpoint)
    trainer = build_dpo_trainer(model, tokenizer, toy_pairs(0, 4), [], settings(), tmp_path,
                                StageLogger("dpo", tmp_path / "metrics.jsonl"), full=True, max_length=64)
    assert trainer.ref_model is not None and trainer.ref_model is not trainer.model
    assert not any(p.requires_grad for p in trainer.ref_model.parameters())
    assert all(p.requires_grad for p in trainer.model.parameters())


def test_dpo_script_on_an_sft_adapter_with_hh_data(sft_adapter, micro_checkpoint, tmp_path):
    def hh(reply: str, i: int) -> str:
        return f"\n\nHuman: Hello\n\nAssistant: Hi!\n\nHuman: Question {i}, can you help?\n\nAssistant: {reply}"

    records = [{"chosen": hh(GOOD, i), "rejected": hh(BAD, i)} for i in range(20)]
    records.append({"chosen": hh(GOOD, 99), "rejected": hh(GOOD, 99)})
    (tmp_path / "hh.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "dpo"
    done = subprocess.run(
        [sys.executable, "scripts/04_dpo.py", "--model_path", str(sft_adapter), "--dataset_path",
         str(tmp_path / "hh.jsonl"), "--output_dir", str(out), "--max_steps", "3", "--batch_size", "4",
         "--gradient_accumulation_steps", "1", "--learning_rate", "5e-3", "--logging_steps", "1",
         "--eval_fraction", "0.1", "--eval_steps", "3", "--max_length", "96"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["dropped_identical"] == 1 and summary["data"]["kept"] == 20
    assert summary["reference"].startswith("frozen copy of the starting adapter")
    assert load_template_name(out / "final") == "chat"  # the SFT checkpoint's template, kept
    assert adapter_base_path(out / "final").resolve() == micro_checkpoint.resolve()
    model, tokenizer = load_model(out)
    assert "ref" not in model.peft_config and tokenizer.chat_template == load_model(sft_adapter)[1].chat_template
    train = [r for r in read_metrics(out / "metrics.jsonl") if r["event"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all({"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= set(r)
               for r in train)


def test_full_dpo_continues_an_sft_adapter_with_every_weight_trainable(sft_adapter, tmp_path):
    # It used to stop with "element 0 of tensors does not require grad": the merged base stayed frozen.
    records = [{"prompt": f"Question {i}?", "chosen": GOOD, "rejected": BAD} for i in range(12)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "dpo-full"
    done = subprocess.run(
        [sys.executable, "scripts/04_dpo.py", "--model_path", str(sft_adapter), "--dataset_path",
         str(tmp_path / "pairs.jsonl"), "--output_dir", str(out), "--full", "--max_steps", "2", "--batch_size", "4",
         "--gradient_accumulation_steps", "1", "--learning_rate", "1e-4", "--eval_fraction", "0", "--max_length", "96"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "full" and summary["steps"] == 2
    assert summary["parameters"]["trainable"] == summary["parameters"]["total"]


def test_loss_types_combine_by_commas_and_unknown_ones_are_named():
    assert DPOSettings(loss_type="sigmoid, sft").loss_types == ["sigmoid", "sft"]
    from utils.config import ConfigError

    with pytest.raises(ConfigError, match=r"field 'loss_type' must be one of .* got 'sigmoid,bogus'"):
        DPOSettings(loss_type="sigmoid,bogus").validate("dpo.json")


def test_dpo_plus_the_chosen_nll_trains_through_trl(micro_checkpoint, tokenizer, tmp_path):
    apply_template(tokenizer, "chatml")
    trainer = build_dpo_trainer(load_base_model(micro_checkpoint), tokenizer, toy_pairs(0, 16), toy_pairs(100, 4),
                                settings(loss_type="sigmoid,sft", max_steps=6), tmp_path,
                                StageLogger("dpo", tmp_path / "metrics.jsonl"), max_length=64)
    assert trainer.loss_types == ["sigmoid", "sft"]
    trainer.train()
    assert trainer.evaluate()["eval_rewards/margins"] > 0
