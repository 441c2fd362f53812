"""Candidate gradients of a plain sequential victim by explicit backpropagation, for many candidate sets at once.

Gradient matching needs, at every iteration, the gradient g(x) of the candidates' loss with
respect to the weights, and then the gradient of a distance d(g(x), g*) with respect to x.
The general path (``optimize.gradient_fn`` under ``torch.func.vmap``) gets g from autograd and
differentiates autograd's own backward formulas a second time, one candidate set per vmap
lane; on a CPU that second pass through BatchNorm's backward and vmap's per-lane weight
gradients is where the time goes.

Here the backward pass of the victim is written out layer by layer in ordinary
differentiable tensor operations, for all candidate sets stacked in one batch: the forward
pass runs once on rows × B images, each layer's weight gradient is reduced per set (a set is
one restart of one reconstruction: B candidates normalized by their own BatchNorm
statistics, as the client's batch was), and the distance's gradient with respect to x is one
first-order autograd pass over that explicit computation. The numbers are those of the
general path up to floating-point order (``tests/unit/test_layerwise.py``).

It applies only where every layer is one it knows: an ``nn.Sequential`` (nested ones
included) of ``Conv2d`` (one group; any of torch's padding modes), ``Linear`` on flat features,
``BatchNorm2d``, ``GroupNorm``, ``ReLU``, ``LeakyReLU``, ``ELU``, ``Sigmoid``, ``Tanh``,
``AdaptiveAvgPool2d`` to 1×1, ``Flatten`` and ``Identity``, with the mean cross-entropy on class
indices or soft labels. Anything else (residual victims, other layers, subclasses with their
own ``forward``) raises ``Unsupported``, and the attack keeps the general path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from leakbench.core import Observation

class Unsupported(ValueError):
    """The victim or the observation is outside what explicit backpropagation covers; the reason says what."""


@dataclass
class _Shape:
    rows: int  # candidate sets
    per_row: int  # candidates per set (B)
    per_stats: int  # candidates sharing BatchNorm statistics (a client's share of the set)
    repeated: dict = field(default_factory=dict)  # weights tiled once per set, kept across calls (``_tiled``)

    def by_row(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(self.rows, self.per_row, *t.shape[1:])

    def by_stats(self, t: torch.Tensor) -> torch.Tensor:
        """rows·B × C × H × W as statistics groups × per_stats × C × H·W (BatchNorm's reduction layout)."""
        return t.reshape(t.shape[0] // self.per_stats, self.per_stats, t.shape[1], -1)

    @property
    def stats_dims(self) -> int | tuple[int, int]:
        """The dimensions of ``by_stats`` that BatchNorm's batch statistics reduce over."""
        return 3 if self.per_stats == 1 else (1, 3)


# --------------------------------------------------------------------------- layers
# forward(module, a, shape) -> (output, saved); backward(module, g, saved, shape, wanted, need_input)
# -> (gradient of the input or None, {leaf name: per-row gradient})


def _conv_forward(m: nn.Conv2d, a: torch.Tensor, shape: _Shape):
    if m.padding_mode == "zeros":
        padded, padding = a, m.padding
    else:
        padded, padding = F.pad(a, m._reversed_padding_repeated_twice, mode=m.padding_mode), (0, 0)
    return F.conv2d(padded, m.weight, m.bias, m.stride, padding, m.dilation), (a, padded, padding)


def _conv_backward(m: nn.Conv2d, g: torch.Tensor, saved, shape: _Shape, wanted: set[str], need_input: bool):
    a, padded, padding = saved
    grads = {}
    if "weight" in wanted:
        grads["weight"] = _conv_weight_grads(m, padded, g, padding, shape)
    if "bias" in wanted:
        grads["bias"] = shape.by_row(g).sum((1, 3, 4))
    if not need_input:
        return None, grads
    g_padded = _ConvInputGradient.apply(g, m.weight, padded.shape, m.stride, padding, m.dilation)
    if m.padding_mode == "zeros":
        return g_padded, grads
    pads = list(m._reversed_padding_repeated_twice)
    if m.padding_mode == "circular":
        return _circular_pad_backward(g_padded, pads, a.shape), grads
    # torch's own adjoints of reflect / replicate padding (differentiable in the incoming gradient)
    return _PAD_BACKWARD[m.padding_mode](g_padded, a, pads), grads


def conv_input_gradient(g: torch.Tensor, like, weight: torch.Tensor, stride, padding, dilation) -> torch.Tensor:
    """``torch.nn.grad.conv2d_input(shape, weight, g, ...)``: the same ``convolution_backward`` call, without the
    Python normalization of its arguments on every call (2 % of the written-out ConvNet pack's step). ``like`` is
    the convolution's input, or its shape."""
    if not isinstance(like, torch.Tensor):
        like = g.new_empty(1).expand(like)
    return torch.ops.aten.convolution_backward(g, like, weight, None, stride, padding, dilation, False, (0, 0), 1,
                                               (True, False, False))[0]


class _ConvInputGradient(torch.autograd.Function):
    """``torch.nn.grad.conv2d_input(shape, weight, g, ...)``, differentiable in ``g`` only, by its own adjoint: the
    forward convolution of the incoming gradient. Autograd's derivative of ``convolution_backward`` also computes
    the weight's gradient, which nothing here wants (the attacker's weights are constants): one wasted
    convolution per layer, 6 % of a ConvNet pack's iteration on a 2-core CPU."""

    @staticmethod
    def forward(ctx, g, weight, shape, stride, padding, dilation):
        if ctx.needs_input_grad[1]:
            raise Unsupported("a victim weight that requires its gradient (the attacker's copy is frozen)")
        ctx.save_for_backward(weight)
        ctx.conf = (stride, padding, dilation)
        return conv_input_gradient(g, shape, weight, stride, padding, dilation)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return F.conv2d(grad, weight, None, *ctx.conf), None, None, None, None, None


_PAD_BACKWARD = {
    "reflect": torch.ops.aten.reflection_pad2d_backward,
    "replicate": torch.ops.aten.replication_pad2d_backward,
}


def _conv_weight_grads(m: nn.Conv2d, a: torch.Tensor, g: torch.Tensor, padding, shape: _Shape) -> torch.Tensor:
    """Every set's weight gradient of a convolution, rows × weight shape: one grouped convolution backward with
    the sets as groups (each set's B candidates as the batch it sums over), which measured faster on a CPU than
    ``torch.vmap`` of the per-set backward, with or without its own derivative."""
    rows = shape.rows
    weight = m.weight if rows == 1 else _tiled(m.weight, rows, shape.repeated)
    grad = torch.ops.aten.convolution_backward(_sets(g, shape), _sets(a, shape), weight, None, m.stride,
                                               padding, m.dilation, False, (0, 0), rows, (False, True, False))[1]
    return grad.reshape(rows, *m.weight.shape)


def _sets(t: torch.Tensor, shape: _Shape) -> torch.Tensor:
    """rows·B × C × H × W -> B × rows·C × H × W: each set's channels side by side, the sets as convolution groups."""
    rows, per_row = shape.rows, shape.per_row
    if per_row == 1:  # one view, not three operations each with its derivative
        return t.reshape(1, rows * t.shape[1], *t.shape[2:])
    return t.reshape(rows, per_row, *t.shape[1:]).transpose(0, 1).reshape(per_row, rows * t.shape[1], *t.shape[2:])


def _tiled(weight: torch.Tensor, rows: int, kept: dict) -> torch.Tensor:
    """``weight`` repeated ``rows`` times along its first dimension (a conv weight: ``repeat(rows, 1, 1, 1)``, a
    vector: ``repeat(rows)``), made once per weight, version and row count: copying every weight at every
    iteration cost about 0.3 ms of a ConvNet pack's 12 ms step on a 2-core CPU."""
    key = (id(weight), weight._version, rows)
    if key not in kept:
        kept[key] = weight.detach().repeat(rows, *([1] * (weight.dim() - 1)))
    return kept[key]


def _circular_pad_backward(g: torch.Tensor, pads, input_shape) -> torch.Tensor:
    """The adjoint of ``F.pad(mode="circular")`` on the last two dimensions: the wrapped borders folded back."""
    left, right, top, bottom = pads
    h, w = input_shape[-2:]
    core = g[..., :, left:left + w].clone()
    if left:
        core[..., :, w - left:] += g[..., :, :left]
    if right:
        core[..., :, :right] += g[..., :, left + w:]
    out = core[..., top:top + h, :].clone()
    if top:
        out[..., h - top:, :] += core[..., :top, :]
    if bottom:
        out[..., :bottom, :] += core[..., top + h:, :]
    return out


def _linear_forward(m: nn.Linear, a: torch.Tensor, shape: _Shape):
    if a.dim() != 2:
        raise Unsupported(f"a Linear layer applied to {a.dim()}-D activations")
    return F.linear(a, m.weight, m.bias), a


def _linear_backward(m: nn.Linear, g: torch.Tensor, a, shape: _Shape, wanted: set[str], need_input: bool):
    rows = shape.by_row(g)
    grads = {}
    if "weight" in wanted:
        grads["weight"] = torch.bmm(rows.transpose(1, 2), shape.by_row(a))
    if "bias" in wanted:
        grads["bias"] = rows.sum(1)
    return (g @ m.weight if need_input else None), grads


def _standardize(v: torch.Tensor, dims, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(v - mean) / sqrt(var + eps) over ``dims`` (biased variance, as BatchNorm and GroupNorm), and that 1/sqrt."""
    return _Standardize.apply(v, dims, eps)


def _standardize_backward(g: torch.Tensor, xhat: torch.Tensor, dims) -> torch.Tensor:
    """sigma times the gradient through ``_standardize`` of the incoming ``g``: g - mean g - xhat mean(g xhat)."""
    return _StandardizeBackward.apply(g, xhat, dims)


def _project(u: torch.Tensor, xhat: torch.Tensor, dims, extra=None) -> torch.Tensor:
    """u - mean u - xhat (mean(u xhat) + extra): the map both standardizing functions' derivatives are made of."""
    c = (u * xhat).mean(dims, keepdim=True)
    if extra is not None:
        c = c + extra
    return u - u.mean(dims, keepdim=True) - xhat * c


class _Standardize(torch.autograd.Function):
    """``_standardize`` with its derivative written out: v̄ = rstd (x̄ - mean x̄ - x̂ (mean(x̄ x̂) + r̄ rstd / N)) for
    the incoming x̄ (of x̂) and r̄ (of rstd), N values per statistic. Autograd's own, through the mean, the square,
    the rsqrt and the products, took about three times as many operations on the same tensors."""

    @staticmethod
    def forward(ctx, v, dims, eps):
        centred = v - v.mean(dims, keepdim=True)
        rstd = torch.rsqrt((centred * centred).mean(dims, keepdim=True) + eps)
        xhat = centred * rstd
        ctx.save_for_backward(xhat, rstd)
        ctx.dims = dims
        ctx.count = v.numel() // rstd.numel()
        return xhat, rstd

    @staticmethod
    def backward(ctx, grad_xhat, grad_rstd):
        xhat, rstd = ctx.saved_tensors
        if grad_xhat is None:
            grad_xhat = torch.zeros_like(xhat)
        extra = None if grad_rstd is None else grad_rstd * rstd / ctx.count
        return rstd * _project(grad_xhat, xhat, ctx.dims, extra), None, None


class _StandardizeBackward(torch.autograd.Function):
    """``g - mean g - x̂ mean(g x̂)`` with its derivative written out: in g the same projection of the incoming ū
    (it is its own adjoint), in x̂ ``-(mean(g x̂) ū + mean(ū x̂) g)``."""

    @staticmethod
    def forward(ctx, g, xhat, dims):
        c = (g * xhat).mean(dims, keepdim=True)
        ctx.save_for_backward(g, xhat, c)
        ctx.dims = dims
        return g - g.mean(dims, keepdim=True) - xhat * c

    @staticmethod
    def backward(ctx, grad):
        g, xhat, c = ctx.saved_tensors
        grad_g = _project(grad, xhat, ctx.dims) if ctx.needs_input_grad[0] else None
        grad_xhat = None
        if ctx.needs_input_grad[1]:
            grad_xhat = -(c * grad + (grad * xhat).mean(ctx.dims, keepdim=True) * g)
        return grad_g, grad_xhat, None


def _batch_norm_forward(m: nn.BatchNorm2d, a: torch.Tensor, shape: _Shape):
    channels = a.shape[1]
    batch_statistics = m.training or m.running_mean is None
    if batch_statistics:
        xhat, rstd = _standardize(shape.by_stats(a), shape.stats_dims, m.eps)
        xhat = xhat.reshape(a.shape)
    else:
        rstd = torch.rsqrt(m.running_var + m.eps).view(1, channels, 1, 1)
        xhat = (a - m.running_mean.view(1, channels, 1, 1)) * rstd
    out = xhat if m.weight is None else xhat * m.weight.view(1, channels, 1, 1) + m.bias.view(1, channels, 1, 1)
    return out, (xhat, rstd, batch_statistics)


def _batch_norm_backward(m: nn.BatchNorm2d, g: torch.Tensor, saved, shape: _Shape, wanted: set[str],
                         need_input: bool):
    xhat, rstd, batch_statistics = saved
    channels = g.shape[1]
    grads = {}
    if "weight" in wanted:
        grads["weight"] = shape.by_row(g * xhat).sum((1, 3, 4))
    if "bias" in wanted:
        grads["bias"] = shape.by_row(g).sum((1, 3, 4))
    if not need_input:
        return None, grads
    if not batch_statistics:  # running statistics: an affine map per channel
        return g * (rstd if m.weight is None else m.weight.view(1, channels, 1, 1) * rstd), grads
    inner = _standardize_backward(shape.by_stats(g), shape.by_stats(xhat), shape.stats_dims)
    gamma = 1.0 if m.weight is None else m.weight.view(1, 1, channels, 1)
    return (gamma * rstd * inner).reshape(g.shape), grads


def _group_norm_forward(m: nn.GroupNorm, a: torch.Tensor, shape: _Shape):
    xhat, rstd = _standardize(a.reshape(a.shape[0], m.num_groups, -1), 2, m.eps)
    xhat = xhat.reshape(a.shape)
    affine = (1, a.shape[1]) + (1,) * (a.dim() - 2)
    out = xhat if m.weight is None else xhat * m.weight.view(affine) + m.bias.view(affine)
    return out, (xhat, rstd, affine)


def _group_norm_backward(m: nn.GroupNorm, g: torch.Tensor, saved, shape: _Shape, wanted: set[str], need_input: bool):
    xhat, rstd, affine = saved
    reduce = (1,) + tuple(range(3, g.dim() + 1))
    grads = {}
    if "weight" in wanted:
        grads["weight"] = shape.by_row(g * xhat).sum(reduce)
    if "bias" in wanted:
        grads["bias"] = shape.by_row(g).sum(reduce)
    if not need_input:
        return None, grads
    gx = g if m.weight is None else g * m.weight.view(affine)
    v = gx.reshape(g.shape[0], m.num_groups, -1)
    return (rstd * _standardize_backward(v, xhat.reshape(v.shape), 2)).reshape(g.shape), grads


def _elementwise(forward: Callable, derivative: Callable):
    """An activation: ``derivative(input, output)`` is its slope, itself differentiable where it must be."""

    def fwd(m, a, shape):
        out = forward(m, a)
        return out, (a, out)

    def bwd(m, g, saved, shape, wanted, need_input):
        return (g * derivative(m, *saved) if need_input else None), {}

    return fwd, bwd


def _relu_forward(m, a, shape):
    out = F.relu(a)
    return out, out


def _relu_backward(m, g, out, shape, wanted, need_input):
    return (torch.ops.aten.threshold_backward(g, out, 0) if need_input else None), {}


def _identity(m, a, shape):
    return a, None


def _identity_backward(m, g, saved, shape, wanted, need_input):
    return (g if need_input else None), {}


def _flatten_forward(m: nn.Flatten, a: torch.Tensor, shape: _Shape):
    if m.start_dim != 1 or m.end_dim != -1:
        raise Unsupported(f"Flatten({m.start_dim}, {m.end_dim})")
    return a.flatten(1), a.shape


def _reshape_backward(m, g, saved, shape, wanted, need_input):
    return (g.reshape(saved) if need_input else None), {}


def _pool_forward(m: nn.AdaptiveAvgPool2d, a: torch.Tensor, shape: _Shape):
    return a.mean((2, 3), keepdim=True), a.shape


def _pool_backward(m, g, saved, shape, wanted, need_input):
    return ((g / (saved[2] * saved[3])).expand(saved) if need_input else None), {}


_SIGMOID = _elementwise(lambda m, a: torch.sigmoid(a), lambda m, a, s: s * (1 - s))
_TANH = _elementwise(lambda m, a: torch.tanh(a), lambda m, a, t: 1 - t * t)
_ELU = _elementwise(lambda m, a: F.elu(a, m.alpha), lambda m, a, out: torch.where(a > 0, 1.0, out + m.alpha))
_LEAKY = _elementwise(lambda m, a: F.leaky_relu(a, m.negative_slope),
                      lambda m, a, out: torch.where(a > 0, 1.0, m.negative_slope))

LAYERS: dict[type, tuple[Callable, Callable]] = {
    nn.Conv2d: (_conv_forward, _conv_backward),
    nn.Linear: (_linear_forward, _linear_backward),
    nn.BatchNorm2d: (_batch_norm_forward, _batch_norm_backward),
    nn.GroupNorm: (_group_norm_forward, _group_norm_backward),
    nn.ReLU: (_relu_forward, _relu_backward),
    nn.Sigmoid: _SIGMOID,
    nn.Tanh: _TANH,
    nn.ELU: _ELU,
    nn.LeakyReLU: _LEAKY,
    nn.Identity: (_identity, _identity_backward),
    nn.Flatten: (_flatten_forward, _reshape_backward),
    nn.AdaptiveAvgPool2d: (_pool_forward, _pool_backward),
}


# --------------------------------------------------------------------------- the plan


def _leaves(model: nn.Module) -> list[nn.Module]:
    """The layers of a sequential model in execution order (nested ``nn.Sequential`` flattened)."""
    if type(model) is not nn.Sequential:
        raise Unsupported(f"the victim is a {type(model).__name__}, not an nn.Sequential")
    out = []
    for child in model:
        if type(child) is nn.Sequential:
            out += _leaves(child)
        elif type(child) not in LAYERS:
            raise Unsupported(f"layer {type(child).__name__} has no explicit backward here")
        else:
            out.append(child)
    return out


def _check(m: nn.Module) -> None:
    if type(m) is nn.Conv2d:
        if m.groups != 1:
            raise Unsupported(f"a grouped convolution ({m.groups} groups)")
        if m.padding_mode not in ("zeros", "circular", *_PAD_BACKWARD):
            raise Unsupported(f"{m.padding_mode} padding")
        if isinstance(m.padding, str):
            raise Unsupported(f"padding={m.padding!r}")
    if type(m) is nn.AdaptiveAvgPool2d and m.output_size not in (1, (1, 1)):
        raise Unsupported(f"adaptive pooling to {m.output_size}")


class LayerwiseGradients:
    """``grads(x, y)``: every candidate set's gradient of its mean cross-entropy, by explicit backpropagation.

    ``x`` is rows × B × C × H × W (one candidate set per row), ``y`` rows × B class indices
    or rows × B × classes soft labels; the result holds one tensor per parameter the
    observation names, in its order, each rows × parameter shape. Build with
    ``LayerwiseGradients.build``, which raises ``Unsupported`` for a victim it cannot handle.
    """

    def __init__(self, layers: list[nn.Module], order: list[tuple[int, str]], per_stats: int | None):
        self.layers = layers
        self.order = order  # for each observed parameter: (layer index, leaf name)
        self.per_stats = per_stats  # candidates per BatchNorm statistics group; None: the whole set
        self.first_needed = min(i for i, _ in order)
        self.wanted = [{leaf for i, leaf in order if i == k} for k in range(len(layers))]
        self.repeated: dict = {}

    @classmethod
    def build(cls, attacker: nn.Module, observation: Observation) -> "LayerwiseGradients":
        if observation.kind != "gradients":
            raise Unsupported(f"observations of kind {observation.kind!r} (only a FedSGD gradient is a plain gradient)")
        layers = _leaves(attacker)
        for m in layers:
            _check(m)
        where = {}
        for k, m in enumerate(layers):
            for leaf, p in m.named_parameters(recurse=False):
                where[id(p)] = (k, leaf)
        named = dict(attacker.named_parameters())
        order = []
        for name in observation.param_names:
            if name not in named or id(named[name]) not in where:
                raise Unsupported(f"parameter {name!r} is not one of the sequential layers'")
            order.append(where[id(named[name])])
        if len(set(order)) != len(order):
            raise Unsupported("a parameter is named twice")
        per_stats = None
        if observation.clients > 1 and observation.bn_mode == "train":
            per_stats = observation.batch_size // observation.clients
        return cls(layers, order, per_stats)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        rows, per_row = x.shape[:2]
        shape = _Shape(rows=rows, per_row=per_row, per_stats=self.per_stats or per_row, repeated=self.repeated)
        a = x.reshape(rows * per_row, *x.shape[2:])
        saved = []
        for m in self.layers:
            a, kept = LAYERS[type(m)][0](m, a, shape)
            saved.append(kept)
        g = _loss_gradient(a, y.reshape(rows * per_row, *y.shape[2:]), per_row)
        found: dict[tuple[int, str], torch.Tensor] = {}
        for k in range(len(self.layers) - 1, self.first_needed - 1, -1):
            m = self.layers[k]
            g, grads = LAYERS[type(m)][1](m, g, saved[k], shape, self.wanted[k], k > self.first_needed)
            for leaf, t in grads.items():
                found[(k, leaf)] = t
        return tuple(found[key] for key in self.order)


def _loss_gradient(logits: torch.Tensor, y: torch.Tensor, per_row: int) -> torch.Tensor:
    """d/dlogits of each set's mean cross-entropy (``F.cross_entropy``'s, for indices or probabilities)."""
    return _softmax_and_loss_gradient(logits, y, per_row)[1]


def _softmax_and_loss_gradient(logits: torch.Tensor, y: torch.Tensor, per_row: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The softmax of the logits and ``_loss_gradient`` (``tangent`` needs both)."""
    p = torch.softmax(logits, 1)
    if y.dim() == 1:  # p - one_hot(y), without one_hot's check of the labels' range (a host sync per call)
        return p, p.scatter_add(1, y.unsqueeze(1), p.new_full((p.shape[0], 1), -1.0)) / per_row
    return p, (p * y.sum(1, keepdim=True) - y) / per_row
