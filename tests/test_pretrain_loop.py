"""The training-loop pieces of utils/training.py, in process, on real micro models and real tokens."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from presets import micro_preset

from utils.model import build_model
from utils.pretrain_run import fewest_steps_decaying_after
from utils.tokens import open_tokens
from utils.training import (
    BadStepGuard,
    BudgetProbe,
    LRSchedule,
    TrainingError,
    WindowSampler,
    build_optimizer,
    build_optimizers,
    check_output_dir,
    clear_output_dir,
    learning_rates,
    load_optimizer_state,
    optimizer_state,
    optimizer_step,
    parse_duration,
    parse_seq_len_schedule,
    seq_len_at,
    steps_in_budget,
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
    losses = [optimizer_step(accelerator, model, [optimizer], [batch], 1.0, 1.0).loss for _ in range(40)]
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
    bad = optimizer_step(accelerator, model, [optimizer], [poisoned], 3.0, 1.0)
    guard.record(bad.applied)
    assert not bad.applied and not math.isfinite(bad.loss)
    assert torch.equal(head, before) and all(p.grad is None for p in model.parameters())
    good = optimizer_step(accelerator, model, [optimizer], [clean], 3.0, 1.0)
    guard.record(good.applied)
    assert good.applied and math.isfinite(good.loss) and not torch.equal(head, before)
    assert (guard.in_a_row, guard.total, guard.failed) == (0, 1, False)
    for _ in range(2):
        guard.record(optimizer_step(accelerator, model, [optimizer], [poisoned], 3.0, 1.0).applied)
    assert guard.failed and guard.total == 3


def test_moe_adds_the_router_loss_and_reports_expert_load(accelerator, tokenizer, processed_dir):
    model, optimizer = prepared(accelerator, tokenizer, n_experts=4, experts_per_token=2, router_aux_loss_coef=0.01)
    batch = WindowSampler(open_tokens(processed_dir, "train"), seed=0).windows(0, 2, 32)
    result = optimizer_step(accelerator, model, [optimizer], [batch], 0.3, 1.0, aux_loss_coef=0.01, top_k=2,
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


def test_a_refitted_budget_never_takes_back_full_rate_steps():
    # Half-way through a wsd run of 1,000 steps (decay from step 802) the run finds it has time for 500 in all:
    # laid out over 500, the decay would have begun at step 402, before now. The count becomes the fewest steps
    # whose decay starts no earlier than now; a count that decays later is kept as it is.
    schedule = LRSchedule("wsd", 1.0, warmup_steps=10, total_steps=1000)
    assert schedule.decay_start == 802
    steps = fewest_steps_decaying_after(schedule, 450, 500)
    assert steps == 560 and dataclasses.replace(schedule, total_steps=steps).decay_start == 450
    assert dataclasses.replace(schedule, total_steps=steps - 1).decay_start < 450
    assert fewest_steps_decaying_after(schedule, 450, 900) == 900
    assert fewest_steps_decaying_after(dataclasses.replace(schedule, name="constant"), 450, 300) == 450


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


def test_muon_lowers_the_loss_and_keeps_embeddings_head_and_norms_on_adamw(accelerator, tokenizer, processed_dir):
    model = build_model(micro_preset(len(tokenizer)), tokenizer, seed=0).train()
    optimizers = build_optimizers(model, "muon", learning_rate=3e-3, weight_decay=0.0, muon_learning_rate=0.02)
    muon, adamw = optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    assert id(model.get_input_embeddings().weight) not in muon_ids
    assert all(p.dim() == 2 for g in muon.param_groups for p in g["params"])
    assert len(muon_ids) == 2 * 7  # q, k, v, o, gate, up, down of each layer
    model, *optimizers = accelerator.prepare(model, *optimizers)
    batch = WindowSampler(open_tokens(processed_dir, "train"), seed=0).windows(0, 4, 64)
    losses = [optimizer_step(accelerator, model, optimizers, [batch], 1.0, 1.0).loss for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0]
    assert learning_rates(optimizers) == {"muon_lr": 0.02, "lr": 3e-3}


def test_muon_refuses_parameters_it_cannot_orthogonalise(tokenizer):
    moe = build_model(micro_preset(len(tokenizer), n_experts=4, experts_per_token=2), tokenizer, seed=0)
    with pytest.raises(TrainingError, match=r"--optimizer muon: parameter .*experts.* has shape \(4, .*3-D"):
        build_optimizers(moe, "muon", 3e-3, 0.0)
    with pytest.raises(TrainingError, match="--optimizer must be one of"):
        build_optimizers(moe, "sgd", 3e-3, 0.0)


def test_muon_fp32_orthogonalisation_matches_torchs_bf16_one():
    # torch's own iteration runs in bf16; CPUs without fast bf16 run the same iteration in fp32.
    from utils import training

    coefficients = (3.4445, -4.775, 2.0315)
    for shape in ((96, 32), (32, 96)):
        grad = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
        ours = training._newton_schulz_fp32(grad, coefficients, 5, 1e-7)
        theirs = training._torch_newton_schulz(grad, coefficients, 5, 1e-7).float()
        assert ours.dtype == torch.float32 and ours.shape == grad.shape
        torch.testing.assert_close(ours, theirs, atol=0.02, rtol=0.05)
        singular = torch.linalg.svdvals(ours)
        assert 0.5 < singular.min() and singular.max() < 1.5  # roughly orthogonal: Muon's quintic lands in (0.5, 1.5)


def test_resumed_optimizer_takes_this_runs_settings_not_the_saved_ones(accelerator, tokenizer, processed_dir):
    # A resume that changes --weight_decay must train with the new value; the saved state carries only moments.
    model = build_model(micro_preset(len(tokenizer)), tokenizer, seed=0).train()
    model, *optimizers = accelerator.prepare(model, *build_optimizers(model, "muon", 3e-3, 0.1))
    batch = WindowSampler(open_tokens(processed_dir, "train"), seed=0).windows(0, 4, 64)
    optimizer_step(accelerator, model, optimizers, [batch], 1.0, 1.0)
    saved = optimizer_state(accelerator, model, optimizers)
    fresh = build_optimizers(accelerator.unwrap_model(model), "muon", 3e-3, 0.01)
    load_optimizer_state(accelerator, model, fresh, saved)
    assert fresh[0].param_groups[0]["weight_decay"] == 0.01
    momentum = next(iter(fresh[0].state.values()))["momentum_buffer"]
    assert torch.equal(momentum, next(iter(optimizers[0].optimizer.state.values()))["momentum_buffer"])


def test_durations_and_the_steps_that_fit_a_budget():
    assert [parse_duration(t) for t in ("45s", "10m", "1.5h", " 2H ")] == [45, 600, 5400, 7200]
    for bad in ("10", "ten minutes", "0m", "-5s", "1.5 h"):
        with pytest.raises(TrainingError, match=r"--time_budget .* use a number with s, m or h: 45s, 10m, 1.5h"):
            parse_duration(bad)
    probe = BudgetProbe(step=1.0, evaluation=4.0, save=2.0)
    # 100 s left after 10 s of start-up, 5 % kept back, minus the final evaluation and save (4 + 2·2 s).
    assert steps_in_budget(110, 10, probe, eval_steps=0, save_steps=0) == 87
    # Every 10 steps an evaluation (which may also write best/, 4 + 2 s) and every 20 a checkpoint (2 s).
    assert steps_in_budget(110, 10, probe, eval_steps=10, save_steps=20) == 51
    assert steps_in_budget(12, 10, probe, eval_steps=0, save_steps=0) == 0
