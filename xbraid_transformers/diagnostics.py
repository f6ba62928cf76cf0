"""Per-layer Lipschitz estimates (docs/algorithm.md, "Layers as time steps": why buffer layers exist).

The local Lipschitz constant of a layer at a state x is the spectral norm of its Jacobian,
estimated by power iteration on J^T J: each iteration is one Jacobian-vector product
(``torch.func.jvp``) and one vector-Jacobian product (``torch.func.vjp``), so the Jacobian is
never formed. ``layer_lipschitz`` walks a drop-in stack serially and reports, for every layer,
the estimate at that layer's input state: the layers whose constants grow first are the
candidates for buffer layers.
"""
from __future__ import annotations

import contextlib
from typing import Callable, List, Optional

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["spectral_norm", "layer_lipschitz"]


def spectral_norm(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, iters: int = 50,
                  rtol: float = 1e-6, generator: Optional[torch.Generator] = None) -> float:
    """Largest singular value of the Jacobian of ``fn`` at ``x`` (power iteration, JVP + VJP).

    Stops after ``iters`` iterations or once the estimate changes by less than ``rtol``
    (relative). Attention runs through the math kernel, which supports forward-mode AD.
    """
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be a positive integer, got {iters!r}")
    x = x.detach()
    v = torch.randn(x.shape, dtype=x.dtype, generator=generator).to(x.device)
    v = v / v.norm()
    sigma = 0.0
    with sdpa_kernel(SDPBackend.MATH), torch.enable_grad():
        _, vjp_fn = torch.func.vjp(fn, x)
        for _ in range(iters):
            _, jv = torch.func.jvp(fn, (x,), (v,))
            new_sigma = jv.norm().item()
            (w,) = vjp_fn(jv)
            norm = w.norm()
            if norm == 0:
                return 0.0
            v = w / norm
            if abs(new_sigma - sigma) <= rtol * new_sigma:
                return new_sigma
            sigma = new_sigma
    return sigma


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module):
    modes = [m.training for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in zip(module.modules(), modes):
            m.training = mode


def layer_lipschitz(model, *inputs, of: str = "rhs", iters: int = 50, rtol: float = 1e-6,
                    seed: int = 0, **kwargs) -> List[float]:
    """Lipschitz estimate of every layer of a drop-in stack, at the serial forward's states.

    model: a ``LayerParallelTransformerEncoder`` / ``...Decoder`` / ``LayerParallelTransformer``.
    inputs, kwargs: what its ``forward`` takes (src and masks; tgt, memory and masks; ...).
    of: ``"rhs"`` for the right-hand side F_n (the step map's constant is then at most
        1 + h_n * L_n), ``"step"`` for the step map x + h_n F_n(x) itself.
    Dropout is off during the estimate (the module's train/eval flags are restored after).
    """
    if of not in ("rhs", "step"):
        raise ValueError(f"of must be 'rhs' or 'step', got {of!r}")
    generator = torch.Generator().manual_seed(seed)
    estimates = []
    with _eval_mode(model), torch.no_grad():
        x, ctx = model.state_and_context(*inputs, **kwargs)
        for layer, h in model.steps():
            def rhs(u, layer=layer):
                return model.ode_rhs(layer, u, **ctx)

            def step(u, layer=layer, h=h):
                return u + h * model.ode_rhs(layer, u, **ctx)

            estimates.append(spectral_norm(rhs if of == "rhs" else step, x, iters, rtol, generator))
            x = x + h * model.ode_rhs(layer, x, **ctx)
    return estimates
