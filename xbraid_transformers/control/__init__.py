"""Adaptive control of layer-parallel training: the convergence-factor indicator
(docs/algorithm.md, "Adaptive control").

Production steps run MGRIT with few iterations (1-2), too few to measure a convergence factor.
Every ``probe_every`` optimizer steps the controller turns the next step into a *probe*: the
same batch, the same dropout masks, the same update rule, but with enough MGRIT iterations to
read the convergence factor of the final iteration, rho = r_k / r_{k-1}, for the forward and
the backward solve. When rho exceeds the threshold the controller acts:

- ``"serial"``: exact serial training from the next step on (never switches back);
- ``"increase"``: double the iteration count of the offending direction, up to ``max_iters``;
- ``"increase-then-serial"``: increase while below the cap, then switch to serial;
- ``"monitor"``: measure and log only (for plots of a pure layer-parallel run).

What crosses the threshold is the ``trigger``:

- ``"rho"`` (default): the convergence factor of the probe's final iteration, rho > ``threshold``.
- ``"gradient"``: the relative error of the production gradient, estimated at the probe:
  the probe step first runs its micro-batches at the *production* iteration counts (a
  reference pass, gradient g_k), then again, from the same random state and dropout masks, at
  the probe counts (g_p, the gradient the optimizer uses, as with the rho trigger). The
  estimate is e = ||g_k - g_p|| / ||g_p||, and the controller acts when e > ``grad_threshold``.
  Why: the bias of the training step is g_k - g*, not rho; e estimates ||g_k - g*|| / ||g*||
  to within ||g_p - g*|| (the triangle inequality), which the probe's extra iterations make
  small. And e < 1 is what keeps g_k a descent direction (<g_k, g*> >= ||g*|| (||g*|| - ||g_k - g*||)),
  so a threshold below 1 (default 0.5: an angle under 30 degrees) leaves a margin. rho is
  still measured and logged at every probe. The cost: one extra pass at the production counts
  per probe. The optimizer's trajectory is that of the rho trigger until the first switch
  (with ``warm_start`` the probe pass starts from the reference pass's states instead).

Usage (exactly this order; ``app/trainer.py`` does it through ``app.steps.ControllerHooks``)::

    ctl = AdaptiveController(model, probe_every=500, threshold=1.0, action="serial")
    for batch in batches:
        ctl.before_step()                   # sets probe iterations when this step is a probe
        again = True
        while again:                        # twice on a probe of the gradient trigger
            for micro_batch in batch:       # gradient accumulation: any number of backwards
                loss(model, micro_batch).backward()
            again = ctl.after_backward()    # before clipping: the trigger reads raw gradients
        optimizer.step()
        decision = ctl.after_step()         # reads the last solve, restores iterations, acts
        optimizer.zero_grad()

``after_step`` reads the statistics of the last forward/backward solve of each
``LayerParallel`` module (the last micro-batch of the step) and returns the
:class:`Decision` of a probe step, or None. Dropout masks need no refresh call: each
``LayerParallel`` keys its masks by a per-forward counter, which the controller's
``state_dict`` saves and restores with its own state.

Round-off guard: near the float32 floor rho drifts toward 1 even for a converged solve, so rho
is ignored when the final residual is below ``floor`` times the norm of the states. The state
norm is estimated during the probe as sqrt(#fine C-points) * ||u_N|| for the forward (u_N: the
module's output) and sqrt(#fine C-points) * ||lambda_N|| for the adjoint (lambda_N: the
gradient arriving at the output); the residual sums over the same C-points.
"""
from ._config import ACTIONS, TRIGGERS, ControlConfig
from ._controller import AdaptiveController
from ._evidence import Decision, Measurement

__all__ = ["ACTIONS", "TRIGGERS", "ControlConfig", "AdaptiveController", "Decision", "Measurement"]
