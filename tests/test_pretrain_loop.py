"""The training-loop pieces of utils/training.py, in process, on real micro models and real tokens."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from utils.config import micro_preset
from utils.model import build_model
from utils.tokens import open_tokens
from utils.training import (
    BadStepGuard,
    LRSchedule,
    TrainingError,
    WindowSampler,
    build_optimizer,
    check_output_dir,
    clear_output_dir,
    optimizer_step,
    parse_seq_len_schedule,
    seq_len_at,
)


@pytest.fixture()
def accelerator():
    AcceleratorState._reset_state(reset_partial_state=True)
    yield Accelerator(cpu=True, mixed_precision="no")
    AcceleratorState._reset_state(reset_partial_state=True)


def prepared(accelerator, tokenizer, **preset_changes):
    model = build_model(micro_preset(len(tokenizer), **preset_changes), tokenizer, seed=0).train()
    return accelerator.prepare(model, build_optimizer(model, learning_rate=3e-3, weight_decay=0.0))


def test_loss_falls_when_overfitting_one_batch(accelerator, tokenizer, processed_dir):
    model, optimizer = prepared(accelerator, tokenizer)
    batch = WindowSampler(open_tokens(processed_dir, "train"), seed=0).windows(0, 4, 64)
    losses = [optimizer_step(accelerator, model, optimizer, [batch], 3e-3, 1.0).loss for _ in range(40)]
    assert losses[-1] < 0.5 * losses[0]


def test_non_finite_loss_skips_the_update_and_a_clean_batch_trains_again(accelerator, tokenizer, processed_dir):
    # Untied embeddings with one NaN row: batches holding that token give NaN, the others train normally.
    model, optimizer = prepared(accelerator, tokenizer, tie_word_embeddings=False)
    tokens = open_tokens(processed_dir, "train")
    poisoned_id = int(tokens[0])
    with torch.no_grad():
        model.get_input_embeddings().weight[poisoned_id] = float("nan")
    sampler = WindowSampler(tokens, seed=0)
    windows = sampler.windows(0, 64, 32)
    has_token = (windows[:, :-1] == poisoned_id).any(dim=1)
    poisoned, clean = windows[has_token][:2], windows[~has_token][:2]
    assert len(poisoned) == 2 and len(clean) == 2

    guard = BadStepGuard(max_bad_steps=2)
    head = model.get_output_embeddings().weight
    before = head.detach().clone()
    bad = optimizer_step(accelerator, model, optimizer, [poisoned], 1e-2, 1.0)
    guard.record(bad.applied)
    assert not bad.applied and not math.isfinite(bad.loss)
    assert torch.equal(head, before) and all(p.grad is None for p in model.parameters())
    good = optimizer_step(accelerator, model, optimizer, [clean], 1e-2, 1.0)
    guard.record(good.applied)
    assert good.applied and math.isfinite(good.loss) and not torch.equal(head, before)
    assert (guard.in_a_row, guard.total, guard.failed) == (0, 1, False)
    for _ in range(2):
        guard.record(optimizer_step(accelerator, model, optimizer, [poisoned], 1e-2, 1.0).applied)
    assert guard.failed and guard.total == 3


def test_moe_adds_the_router_loss_and_reports_expert_load(accelerator, tokenizer, processed_dir):
    model, optimizer = prepared(accelerator, tokenizer, n_experts=4, experts_per_token=2, router_aux_loss_coef=0.01)
    batch = WindowSampler(open_tokens(processed_dir, "train"), seed=0).windows(0, 2, 32)
    result = optimizer_step(accelerator, model, optimizer, [batch], 1e-3, 1.0, aux_loss_coef=0.01, top_k=2,
                            want_expert_load=True)
    assert result.applied and result.aux_loss == pytest.approx(2.0, abs=0.5)  # ≈ top_k when balanced
    assert len(result.expert_load) == 4 and sum(result.expert_load) == pytest.approx(1.0)
    router = next(p for n, p in model.named_parameters() if "gate.weight" in n)
    assert router.grad is None  # gradients were consumed by the update and cleared


def test_window_order_depends_only_on_seed_and_cursor():
    tokens = np.arange(10_001, dtype=np.uint16)
    for mode in ("strided", "random"):
        one_go = WindowSampler(tokens, seed=3, mode=mode).windows(0, 60, 100)
        resumed = WindowSampler(tokens, seed=3, mode=mode)
        pieces = torch.cat([resumed.windows(0, 25, 100), resumed.windows(25, 35, 100)])
        assert torch.equal(one_go, pieces)
        assert torch.equal(one_go[:, 1:], one_go[:, :-1] + 1)  # contiguous windows of length + 1
        assert not torch.equal(one_go, WindowSampler(tokens, seed=4, mode=mode).windows(0, 60, 100))
    epoch = WindowSampler(tokens, seed=3).windows(0, 100, 100)
    assert sorted(epoch[:, 0].tolist()) == list(range(0, 10_000, 100))  # strided: every window once per epoch


def test_schedules_warm_up_then_reach_their_floor():
    def lr(name, step):
        return LRSchedule(name, 1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1, decay_fraction=0.2)(step)

    assert [lr("cosine", s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    for name in ("cosine", "linear", "wsd"):
        assert lr(name, 109) == pytest.approx(0.1) and lr(name, 500) == pytest.approx(0.1)
    assert lr("cosine", 60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 51 / 100)))
    assert lr("linear", 59) == pytest.approx(0.55)
    assert lr("wsd", 89) == 1.0 and lr("wsd", 90) < 1.0  # stable until the last 20 % of 100 post-warmup steps
    assert lr("constant", 109) == 1.0
    with pytest.raises(TrainingError, match="--lr_scheduler"):
        LRSchedule("step", 1.0, 0, 10)


def test_sequence_length_curriculum():
    stages = parse_seq_len_schedule("16:0.25,32:0.5,64:1.0", 64)
    assert [seq_len_at(stages, s, 100) for s in (0, 24, 25, 49, 50, 99)] == [16, 16, 32, 32, 64, 64]
    assert parse_seq_len_schedule(None, 64) == [(64, 1.0)]
    for bad, message in (("48:0.5,64:1.0", "divide"), ("32:0.5,64:0.9", "end at fraction 1.0"),
                         ("32:0.6,16:0.5,64:1.0", "increase"), ("32-0.5", "LENGTH:FRACTION")):
        with pytest.raises(TrainingError, match=message):
            parse_seq_len_schedule(bad, 64)


def test_output_dir_rules(tmp_path):
    check_output_dir(tmp_path / "new", resuming=False, overwrite=False)
    (tmp_path / "step_10").mkdir()
    (tmp_path / "latest").write_text("step_10\n")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite_output_dir"):
        check_output_dir(tmp_path, resuming=False, overwrite=False)
    check_output_dir(tmp_path, resuming=True, overwrite=False)
    assert clear_output_dir(tmp_path) == ["latest", "step_10"]
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
