"""xbt.adapters.AdaptiveCallback: the adaptive controller inside transformers.Trainer.

The oracle is a hand-written loop that drives xbt.AdaptiveController on the same tiny Llama
(same initialisation, batches, optimizer, clipping and gradient accumulation, the controller's
protocol as in the library's trainer): the Trainer run must measure the same rho at every probe
and take the same decisions. A run resumed from a Trainer checkpoint must continue with the
uninterrupted run's decisions. Nothing is downloaded: a config, random weights, random tokens.
"""
import os
import types

import pytest
import torch

import xbraid_transformers as xbt
from xbraid_transformers.adapters import make_layer_parallel

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")          # Trainer needs it (the hf extra installs it)
transformers.logging.set_verbosity_error()
pytestmark = pytest.mark.slow             # four short Trainer runs and a loop (about a minute)

VOCAB, SEQ, BATCH, ACCUM, STEPS = 40, 8, 2, 2, 4
# 16 blocks, cfactor 2: 8 coarse intervals, so no probe (at most 4 iterations) is exact and
# every rho is a convergence factor above round-off.
LAYERS, MGRIT = 16, dict(levels=2, cfactor=2, fwd_iters=1, bwd_iters=1)
# Every usable rho crosses: the probe of step 0 doubles the iterations (1 -> 2), the probe of
# step 2 finds them at the cap and switches to serial.
CONTROL = dict(probe_every=2, threshold=1e-12, floor=0.0, action="increase-then-serial",
               max_iters=2)
LR = 3e-3


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=LAYERS,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
        attention_dropout=0.1, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = transformers.LlamaForCausalLM(config)
    return make_layer_parallel(model, mgrit=xbt.MGRITConfig(**MGRIT), dropout_seed=7).train()


def examples(steps=STEPS):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (steps * ACCUM * BATCH, SEQ), generator=g)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def optimizer_of(model):
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)


def hand_written_loop():
    """The controller's protocol around Trainer's arithmetic: micro-batches in order, the loss
    normalised by the step's token count, clipping to 1, AdamW."""
    model = tiny_llama()
    opt, _ = optimizer_of(model)
    controller = xbt.AdaptiveController(model, **CONTROL)
    data = examples()
    for step in range(STEPS):
        rows = data[step * ACCUM * BATCH:(step + 1) * ACCUM * BATCH]
        micro = [rows[i:i + BATCH] for i in range(0, len(rows), BATCH)]
        batches = [{k: torch.stack([r[k] for r in m]) for k in ("input_ids", "labels")}
                   for m in micro]
        items = sum(b["labels"][..., 1:].ne(-100).sum() for b in batches)
        controller.before_step()
        for batch in batches:
            model(**batch, num_items_in_batch=items).loss.backward()
        assert not controller.after_backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        controller.after_step()
        model.zero_grad()
    return controller


def trainer_run(out_dir, resume=None, restore_callbacks=False):
    """A Trainer run with the callback; the callback Trainer used at the end (a new one when it
    restores callbacks from the checkpoint itself)."""
    model = tiny_llama()
    callback = xbt.adapters.AdaptiveCallback(**CONTROL)
    args = transformers.TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUM, max_steps=STEPS, max_grad_norm=1.0,
        logging_steps=1000, save_strategy="steps", save_steps=1, report_to="none",
        disable_tqdm=True, train_sampling_strategy="sequential", seed=0, use_cpu=True,
        dataloader_num_workers=0, restore_callback_states_from_checkpoint=restore_callbacks)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=examples(),
                                   optimizers=optimizer_of(model), callbacks=[callback])
    trainer.train(resume_from_checkpoint=resume)
    used = [c for c in trainer.callback_handler.callbacks
            if isinstance(c, xbt.adapters.AdaptiveCallback)]
    assert len(used) == 1 and (used[0] is callback) == (not (resume and restore_callbacks))
    return trainer, used[0]


def summary(decisions):
    return [(d.step, d.action, d.iters_before, d.iters_after, d.mode_after) for d in decisions]


def rho_table(decisions):
    return torch.tensor([[d.rho["forward"], d.rho["backward"]] for d in decisions],
                        dtype=torch.float64)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("trainer")
    reference = hand_written_loop()
    trainer, callback = trainer_run(out)
    resumed_trainer, resumed = trainer_run(tmp_path_factory.mktemp("resumed"),
                                           resume=str(out / "checkpoint-1"))
    _, restored = trainer_run(tmp_path_factory.mktemp("restored"), resume=str(out / "checkpoint-1"),
                              restore_callbacks=True)
    return dict(reference=reference, trainer=trainer, callback=callback,
                resumed_trainer=resumed_trainer, resumed=resumed, restored=restored)


def test_trainer_measures_the_same_rho_and_decides_the_same_as_the_hand_written_loop(runs):
    ours, theirs = runs["callback"].controller.decisions, runs["reference"].decisions
    assert [d.action for d in theirs] == ["increase", "serial"]   # the run covers both
    residuals = [m.residuals[-1] for d in theirs for m in d.measurements]
    assert min(residuals) > 1e-6                    # rho is measured above round-off
    assert summary(ours) == summary(theirs)
    torch.testing.assert_close(rho_table(ours), rho_table(theirs), rtol=1e-4, atol=0)
    print("rho trainer", rho_table(ours).tolist(), "loop", rho_table(theirs).tolist(),
          "max rel diff", ((rho_table(ours) - rho_table(theirs)).abs() / rho_table(theirs)).max().item())
    assert runs["callback"].controller.mode == "serial" and runs["reference"].mode == "serial"
    assert not any(stack.parallel for stack in xbt.find_stacks(runs["trainer"].model))


def test_decisions_are_in_the_trainer_log_history(runs):
    decisions = runs["callback"].controller.decisions
    logged = [r for r in runs["trainer"].state.log_history if "xbt_action" in r]
    assert [r["step"] for r in logged] == [d.step + 1 for d in decisions]   # global_step
    for record, decision in zip(logged, decisions):
        assert record["xbt_probe_step"] == decision.step
        assert record["xbt_action"] == decision.action and record["xbt_reason"] == decision.reason
        assert record["xbt_rho_forward"] == decision.rho["forward"]
        assert record["xbt_rho_backward"] == decision.rho["backward"]
        assert record["xbt_mode"] == decision.mode_after
        assert [record["xbt_fwd_iters"], record["xbt_bwd_iters"]] == decision.iters_after[0]
        assert "loss" in record                   # Trainer's own record of that step


def test_a_resumed_trainer_run_continues_the_same_decisions(runs):
    """Resumed from checkpoint-1 (iterations 2 after the first probe), the probe at step 2 finds
    them at the cap and switches, as the uninterrupted run did; a controller restarted from
    nothing would have increased 1 -> 2 instead."""
    full = runs["callback"].controller
    # the callback loads its state from the checkpoint, or Trainer restores the callback
    for resumed in (runs["resumed"].controller, runs["restored"].controller):
        assert summary(resumed.decisions) == summary(full.decisions)
        torch.testing.assert_close(rho_table(resumed.decisions), rho_table(full.decisions),
                                   rtol=1e-4, atol=0)
        assert resumed.step == full.step == STEPS and resumed.mode == "serial"
    logged = [[(r["step"], r["xbt_action"]) for r in run.state.log_history if "xbt_action" in r]
              for run in (runs["trainer"], runs["resumed_trainer"])]
    assert logged[0] == logged[1] == [(1, "increase"), (3, "serial")]


def test_several_processes_and_the_gradient_trigger_are_refused():
    callback = xbt.adapters.AdaptiveCallback(**CONTROL)
    state = transformers.TrainerState()
    for world, gpus in ((2, 1), (1, 2)):
        args = types.SimpleNamespace(world_size=world, n_gpu=gpus)
        with pytest.raises(RuntimeError, match="one Trainer process on one device"):
            callback.on_train_begin(args, state, transformers.TrainerControl(), model=tiny_llama())
    with pytest.raises(ValueError, match="trigger='rho' only"):
        xbt.adapters.AdaptiveCallback(trigger="gradient")
    with pytest.raises(ValueError, match="no LayerParallel module"):
        callback.on_train_begin(types.SimpleNamespace(world_size=1, n_gpu=1), state,
                                transformers.TrainerControl(), model=torch.nn.Linear(2, 2))
