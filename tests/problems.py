"""Test problems with known answers: analytic ODEs and tiny ODE networks."""
import torch
from torch import nn


def dahlquist_backward_euler(lam=-1.0):
    """u' = lam u by backward Euler: u_{n+1} = u_n / (1 - lam dt)."""
    return lambda u, n, dt: u / (1.0 - lam * dt)


def nonlinear_step(u, n, dt):
    """Forward Euler on u' = -u^3 + sin(n) (time-dependent, nonlinear)."""
    return u + dt * (-u ** 3 + torch.sin(torch.tensor(float(n), dtype=u.dtype)))


def serial_states(step, u0, num_steps, h):
    states = [u0]
    for n in range(num_steps):
        states.append(step(states[-1], n, h))
    return states


class TanhLayer(nn.Module):
    """F(x) = tanh(x W + b) (an ODE layer with a dense Jacobian)."""

    def __init__(self, width, scale=1.0):
        super().__init__()
        self.linear = nn.Linear(width, width)
        with torch.no_grad():
            self.linear.weight.mul_(scale)

    def forward(self, x, shift=None):
        y = self.linear(x)
        if shift is not None:
            y = y + shift
        return torch.tanh(y)


class DropoutLayer(nn.Module):
    """F(x) = dropout(tanh(x W)) with a record of every mask it drew."""

    def __init__(self, width, p=0.3):
        super().__init__()
        self.linear = nn.Linear(width, width, bias=False)
        self.p = p
        self.masks = []

    def forward(self, x):
        keep = (torch.rand_like(x) >= self.p)
        if self.training:
            self.masks.append(keep.clone())
            return torch.tanh(self.linear(x)) * keep / (1 - self.p)
        return torch.tanh(self.linear(x))


def serial_reference(layers, x, h, **ctx):
    """x_{n+1} = x_n + h F_n(x_n) through plain autograd."""
    for layer in layers:
        x = x + h * layer(x, **ctx)
    return x
