"""Multilevel training in depth: train coarse discretisations of the ODE, then the fine one.

A stack of N layers with step h is a forward-Euler discretisation of an ODE; every other layer
with step 2h is a coarser discretisation of the same ODE. A *coarse view* makes a model's
LayerParallel stacks use the layers ``offset, offset + stride, ...`` with step ``stride * h``.
The view shares the layer modules with the fine model, so restriction is the view itself and
prolongation (handing the trained coarse layers back) needs no copy: training the view updates
the fine model's layers in place, and the skipped layers stay untouched.

For nested iteration (train N/4 layers, then N/2, then N), ``prolongate`` fills the layers a
coarse view skipped, by copying the nearest trained layer before them or by linear
interpolation between the trained neighbours.

A ``MultilevelSchedule`` says which view every optimisation step uses. Choices it makes
explicit (arXiv 2504.18590 leaves them open):
- cycle lengths: ``coarse_steps`` per coarse view, ``fine_steps`` per fine phase;
- ``coarse_gradients``: a coarse layer's step is ``stride * h``, so its gradient carries that
  factor, and one SGD step on a view of stride s moves the ODE's output about s times as far
  as a fine step with the same learning rate (s^2 from the step size, 1/s from the layer
  count). ``"scaled"`` (default) divides the gradients of the view's layers by s, which makes
  a learning rate mean the same on every level (and the scaled gradient of a coarse layer
  close to the mean fine gradient of the layers it stands for); ``"raw"`` keeps autograd's.
  Adam-type optimizers are invariant to the scale, up to gradient clipping and epsilon;
- optimizer state at a phase change: ``"keep"`` (one optimizer throughout: momentum of the
  shared layers carries over), ``"reset"`` (the state of every parameter is dropped when the
  phase changes) or ``"transfer"`` (as keep, and a prolongation also gives each filled layer
  the optimizer state of the trained layer before it, whose weights it starts from);
- ``mgopt``: the MG/OPT first-order correction. At the start of a coarse phase the fine gradient
  g_h and the coarse gradient g_H are taken at the same point on one batch; during the phase the
  coarse gradient is replaced by g_H - (g_H(start) - R g_h(start)), so that the first coarse
  step follows the fine gradient. R is injection: a coarse layer's restricted gradient is the
  fine gradient of the same layer; parameters outside the stacks map one to one.
- ``line_search`` (with mgopt): MG/OPT's safeguard. The coarse phase moves the parameters from
  theta_0 to theta_1; afterwards the fine loss on the phase's first batch (model in eval mode)
  is compared at theta_0 + a (theta_1 - theta_0) for a = 1, 1/2, 1/4, 1/8, and the first a
  that lowers it below the value at theta_0 is kept (none: theta_0 is restored). When a < 1
  the optimizer state of the moved parameters is dropped: it was built along the rejected
  path.

``MultilevelConfig`` builds a schedule for a run of a given length (the trainer's and
``xbt train --schedule multilevel``'s form); ``MultilevelStepper`` applies a schedule one
optimisation step at a time inside any training loop; ``train_multilevel`` is the whole loop.
On several ranks every rank keeps the layers of its own range in every view.
"""
from ._schedule import (COARSE_GRADIENTS, CYCLES, OPTIMIZER_STATES, PROLONGATIONS, MultilevelConfig,
                        MultilevelSchedule, Phase)
from ._stepper import MultilevelStepper, train_multilevel
from ._views import coarse_view, prolongate, stacks, transfer_optimizer_state

__all__ = ["coarse_view", "prolongate", "transfer_optimizer_state", "stacks", "Phase",
           "MultilevelSchedule", "MultilevelConfig", "MultilevelStepper", "train_multilevel",
           "CYCLES", "PROLONGATIONS", "OPTIMIZER_STATES", "COARSE_GRADIENTS"]
