"""The cosine matching loss's gradient with respect to the candidates, without autograd, for plain ConvNets.

Inverting Gradients needs, every iteration, d/dx of D(g(x)) with g(x) = ∇θ L(x, θ) the candidates'
gradient and D the cosine distance to the observed one. ``layerwise`` writes g out layer by layer
and lets autograd differentiate that explicit computation. Here the second pass is written out too,
by the symmetry of second derivatives:

    dD/dx = Σ γ · ∂g/∂x = ∂/∂x ⟨γ, ∇θ L⟩ = d/dε ∇x L(x, θ + ε γ) at ε = 0,   γ = ∂D/∂g (held fixed),

that is, the derivative of the input gradient ∇x L when the weights move along γ: one forward pass
and one backward pass of tangents beside the usual ones (forward-over-reverse), every candidate set
with its own γ. There is no autograd graph, and the two convolutions of a layer's tangent (its input's
tangent through the weights, the weights' tangent on the input) are one grouped convolution over
concatenated channels, as are the two of its backward tangent. The numbers are those of the autograd
path up to floating-point order (``tests/unit/test_tangent.py``).

It covers ``nn.Sequential`` victims of ``Conv2d`` (zero padding, one group), ``BatchNorm2d`` (batch or
running statistics), ``ReLU``, ``AdaptiveAvgPool2d`` to 1×1, ``Flatten``, ``Linear`` and ``Identity``, with
the mean cross-entropy on class indices or soft labels, and the cosine distance. Anything else raises
``Unsupported`` and the attack keeps ``layerwise`` with autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from leakbench.attacks import layerwise
from leakbench.attacks.layerwise import (
    LayerwiseGradients,
    Unsupported,
    _conv_weight_grads,
    _Shape,
    _sets,
    _softmax_and_loss_gradient,
    _tiled,
    conv_input_gradient,
)

_COVERED = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear, nn.Identity)


def _add(a, b):
    """a + b where None stands for zero."""
    if a is None:
        return b
    if b is None:
        return a
    return a + b


class CosineMatching:
    """``grad_and_value(x, y, targets)``: every row's cosine matching loss and its gradient with respect to x.

    ``x`` is rows × B × C × H × W (one candidate set per row), ``y`` rows × B class indices or
    rows × B × classes soft labels, ``targets`` the rows' observed gradients concatenated in the
    observation's parameter order (rows × values; ``optimize.flat_targets`` of the per-row targets).
    Build with ``CosineMatching.build``, which raises ``Unsupported`` for a victim it does not cover.
    """

    def __init__(self, explicit: LayerwiseGradients):
        self.layers = explicit.layers
        self.order = explicit.order
        self.per_stats = explicit.per_stats
        self.wanted = explicit.wanted
        self.repeated: dict = {}
        self.target_norms: tuple | None = None  # (targets, their version, their norms) of the last call
        self.shapes = [self.layers[k].get_parameter(leaf).shape for k, leaf in self.order]
        self.sizes = [shape.numel() for shape in self.shapes]

    @classmethod
    def build(cls, attacker: nn.Module, observation) -> "CosineMatching":
        explicit = LayerwiseGradients.build(attacker, observation)
        for m in explicit.layers:
            if type(m) not in _COVERED:
                raise Unsupported(f"layer {type(m).__name__} has no written-out second pass here")
            if type(m) is nn.Conv2d and m.padding_mode != "zeros":
                raise Unsupported(f"{m.padding_mode} padding has no written-out second pass here")
        return cls(explicit)

    # ------------------------------------------------------------------ the passes
    def grad_and_value(self, x: torch.Tensor, y: torch.Tensor, targets: torch.Tensor):
        rows, per_row = x.shape[:2]
        shape = _Shape(rows=rows, per_row=per_row, per_stats=self.per_stats or per_row, repeated=self.repeated)
        n = len(self.layers)
        a = x.reshape(rows * per_row, *x.shape[2:])
        saved = []
        for m in self.layers:
            out, kept = _FORWARD[type(m)](m, a, shape)
            saved.append((a, out, kept))
            a = out
        labels = y.reshape(rows * per_row, *y.shape[2:])
        probs, g = _softmax_and_loss_gradient(a, labels, per_row)
        deltas = [None] * n  # deltas[k]: the loss's gradient at layer k's output
        grads: dict[tuple[int, str], torch.Tensor] = {}
        for k in range(n - 1, -1, -1):
            deltas[k] = g
            m = self.layers[k]
            g, found = _BACKWARD[type(m)](m, g, saved[k], shape, self.wanted[k], k > 0)
            grads.update({(k, leaf): t for leaf, t in found.items()})
        flat = torch.cat([grads[key].reshape(rows, -1) for key in self.order], 1)
        known = self.target_norms  # the same targets every iteration of a pack: their norms once
        if known is None or known[0] is not targets or known[1] != targets._version:
            self.target_norms = known = (targets, targets._version, targets.pow(2).sum(1, keepdim=True).sqrt())
        matching, gamma = _cosine_and_derivative(flat, targets, known[2])
        tangents: dict[tuple[int, str], torch.Tensor] = {}
        for key, part, param_shape in zip(self.order, gamma.split(self.sizes, 1), self.shapes):
            tangents[key] = part.reshape(rows, *param_shape)
        # forward tangents: the activations' derivative along γ (the candidates do not move)
        dots = [None] * n
        da = None
        for k, m in enumerate(self.layers):
            da = _TANGENT[type(m)](m, da, saved[k], shape, {leaf: tangents.get((k, leaf)) for leaf in ("weight", "bias")})
            dots[k] = da
        dg = _loss_tangent(probs, da, labels, per_row)
        # backward tangents, down to the candidates
        for k in range(n - 1, -1, -1):
            m = self.layers[k]
            dg = _BACKWARD_TANGENT[type(m)](m, dg, deltas[k], saved[k], dots[k - 1] if k else None, shape,
                                            {leaf: tangents.get((k, leaf)) for leaf in ("weight", "bias")})
        dx = torch.zeros_like(x) if dg is None else dg.reshape(x.shape)
        return matching, dx


# --------------------------------------------------------------------------- loss and distance


def _loss_tangent(p, dlogits, y, per_row):
    """The derivative of ``layerwise._loss_gradient`` along the logits' tangent: the softmax's, p ⊙ (l̇ - Σ p l̇)."""
    if dlogits is None:
        return None
    dp = p * (dlogits - (p * dlogits).sum(1, keepdim=True))
    if y.dim() == 1:
        return dp / per_row
    return dp * (y.sum(1, keepdim=True) / per_row)


def _cosine_and_derivative(g: torch.Tensor, t: torch.Tensor, tn: torch.Tensor):
    """``optimize.cosine_distance_rows`` on concatenated gradients (rows × values, targets rows × values, their
    norms rows × 1), and its derivative in g: -t / d + ⟨g, t⟩ |t| g / (|g| d²) with d = |g| |t| + 1e-12."""
    dot = (g * t).sum(1, keepdim=True)
    gn = g.pow(2).sum(1, keepdim=True).sqrt()
    d = gn * tn + 1e-12
    gamma = torch.addcmul((dot * tn / (gn * d * d)) * g, t, -1 / d)
    return (1 - dot / d).reshape(-1), gamma


# --------------------------------------------------------------------------- layers
# forward(m, a, shape) -> (out, kept); backward(m, g, (a, out, kept), shape, wanted, need_input) -> (g_in, {leaf: rows})
# tangent(m, da, (a, out, kept), shape, dtheta) -> d(out); backward_tangent(m, dg, g, (a, out, kept), da, shape,
# dtheta) -> d(g_in), where g is the loss's gradient at the layer's output and dg its tangent


def _unsets(t: torch.Tensor, shape: _Shape) -> torch.Tensor:
    """The inverse of ``layerwise._sets``."""
    rows, per_row = shape.rows, shape.per_row
    c = t.shape[1] // rows
    if per_row == 1:
        return t.reshape(rows, c, *t.shape[2:])
    return t.reshape(per_row, rows, c, *t.shape[2:]).transpose(0, 1).reshape(rows * per_row, c, *t.shape[2:])


def _per_image(t: torch.Tensor, shape: _Shape) -> torch.Tensor:
    """rows × C per-set values -> rows·B × C × 1 × 1, broadcastable over each set's images."""
    if shape.per_row > 1:
        t = t.repeat_interleave(shape.per_row, 0)
    return t.reshape(t.shape[0], t.shape[1], *([1] * 2))


#: a convolution whose patches (im2col: every output position's receptive field, for all candidates) hold at most
#: this many values keeps them from its forward pass and computes its weights' gradient and its weights' tangent as
#: batched matrix products with them. On an 8-image ConvNet pack at 32 × 32 on a 2-core CPU that was faster than
#: the grouped convolutions with one image per group for the first layer (27 × 1024 values per image: 0.13 ms
#: for the patches, the forward pass, both products, against 0.61 ms) and the last (288 × 64: 0.47 against 0.60 ms),
#: and no faster for the two between (over 2^18 values).
PATCHES_MAX_VALUES = 1 << 18


def _output_size(m, a):
    """The output height and width of convolution ``m`` on ``a``."""
    return tuple((size + 2 * p - d * (k - 1) - 1) // s + 1
                 for size, k, s, p, d in zip(a.shape[2:], m.kernel_size, m.stride, m.padding, m.dilation))


def _patches(m, a: torch.Tensor) -> torch.Tensor | None:
    """im2col of ``a`` for ``m``, N × C·kh·kw × P (F.unfold's layout, from one strided view of the padded input,
    about four times faster than F.unfold here), or None where the patches would be larger than
    ``PATCHES_MAX_VALUES``."""
    n, c = a.shape[:2]
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = m.kernel_size, m.stride, m.padding, m.dilation
    oh, ow = _output_size(m, a)
    if n * c * kh * kw * oh * ow > PATCHES_MAX_VALUES:
        return None
    padded = F.pad(a, (pw, pw, ph, ph)) if ph or pw else a
    s = padded.stride()
    view = padded.as_strided((n, c, kh, kw, oh, ow), (s[0], s[1], s[2] * dh, s[3] * dw, s[2] * sh, s[3] * sw))
    return view.reshape(n, c * kh * kw, oh * ow)


def _conv_forward(m, a, shape):
    cols = _patches(m, a)
    if cols is None:
        return F.conv2d(a, m.weight, m.bias, m.stride, m.padding, m.dilation), None
    out = torch.matmul(m.weight.view(m.out_channels, -1), cols)
    if m.bias is not None:
        out = out + m.bias.view(1, -1, 1)
    oh, ow = _output_size(m, a)
    return out.view(a.shape[0], m.out_channels, oh, ow), cols


def _conv_backward(m, g, saved, shape, wanted, need_input):
    a, cols = saved[0], saved[2]
    grads = {}
    if "weight" in wanted and cols is not None:  # Σ over each set's images of g · patchesᵀ
        per_image = torch.bmm(g.view(g.shape[0], g.shape[1], -1), cols.transpose(1, 2))
        if shape.per_row > 1:
            per_image = per_image.view(shape.rows, shape.per_row, *per_image.shape[1:]).sum(1)
        grads["weight"] = per_image.view(shape.rows, *m.weight.shape)
    elif "weight" in wanted:
        grads["weight"] = _conv_weight_grads(m, a, g, m.padding, shape)
    if "bias" in wanted:
        grads["bias"] = shape.by_row(g).sum((1, 3, 4))
    if not need_input:
        return None, grads
    return conv_input_gradient(g, a, m.weight, m.stride, m.padding, m.dilation), grads


def _conv_tangent(m, da, saved, shape, dtheta):
    """ż = conv(ȧ, W) + conv(a, Ẇ) + ḃ, the first two as one grouped convolution of [ȧ, a] with [W | Ẇ]."""
    a, cols = saved[0], saved[2]
    dw, db = dtheta["weight"], dtheta["bias"]
    rows = shape.rows
    out = None
    if dw is not None and cols is not None:  # conv(ȧ, W) on its own, conv(a, Ẇ) as Ẇ · patches
        per_set = dw.view(rows, 1, dw.shape[1], -1)
        out = torch.matmul(per_set, cols.view(rows, shape.per_row, *cols.shape[1:])).view(a.shape[0], dw.shape[1],
                                                                                       *_output_size(m, a))
        if da is not None:
            out = out + F.conv2d(da, m.weight, None, m.stride, m.padding, m.dilation)
    elif dw is not None and da is not None:
        w = torch.cat([_tiled(m.weight, rows, shape.repeated).view(rows, *m.weight.shape), dw], 2)
        both = _sets(torch.cat([da, a], 1), shape)
        out = _unsets(F.conv2d(both, w.reshape(rows * w.shape[1], *w.shape[2:]), None, m.stride, m.padding,
                               m.dilation, rows), shape)
    elif dw is not None:
        out = _unsets(F.conv2d(_sets(a, shape), dw.reshape(rows * dw.shape[1], *dw.shape[2:]), None, m.stride,
                               m.padding, m.dilation, rows), shape)
    elif da is not None:
        out = F.conv2d(da, m.weight, None, m.stride, m.padding, m.dilation)
    if db is not None:
        out = _add(out, _per_image(db, shape))
    return out


def _fold(cols: torch.Tensor, m, like: torch.Tensor) -> torch.Tensor:
    """The adjoint of ``_patches``: every patch value added back at its input position (F.fold's result, about
    2.5 times faster here as a strided sum over the kernel's taps)."""
    n, c, h, w = like.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = m.kernel_size, m.stride, m.padding, m.dilation
    oh, ow = _output_size(m, like)
    taps = cols.view(n, c, kh, kw, oh, ow)
    out = cols.new_zeros(n, c, h + 2 * ph, w + 2 * pw)
    for i in range(kh):
        band = out[:, :, i * dh:i * dh + sh * (oh - 1) + 1:sh]
        for j in range(kw):
            band[..., j * dw:j * dw + sw * (ow - 1) + 1:sw].add_(taps[:, :, i, j])
    return out[:, :, ph:ph + h, pw:pw + w]


def _conv_backward_tangent(m, dg, g, saved, da, shape, dtheta):
    """d(g_in) = convᵀ(ġ, W) + convᵀ(g, Ẇ), as one grouped transposed convolution of [ġ, g] with [W; Ẇ], or for a
    layer that kept its patches, the patches' adjoint of Wᵀ ġ + Ẇᵀ g (no concatenation, no grouped call)."""
    a, cols = saved[0], saved[2]
    dw = dtheta["weight"]
    rows = shape.rows
    if cols is not None and dw is not None:
        per_set = dw.view(rows, 1, dw.shape[1], -1).transpose(2, 3)  # rows × 1 × C·kh·kw × out channels
        back = torch.matmul(per_set, g.view(rows, shape.per_row, g.shape[1], -1))
        if dg is not None:
            back = back.view(cols.shape).add_(torch.matmul(m.weight.view(m.out_channels, -1).t(),
                                                           dg.view(dg.shape[0], dg.shape[1], -1)))
        return _fold(back.view(cols.shape), m, a)
    if dw is None:
        if dg is None:
            return None
        return conv_input_gradient(dg, a, m.weight, m.stride, m.padding, m.dilation)
    if dg is None:
        both, w = _sets(g, shape), dw.reshape(rows * dw.shape[1], *dw.shape[2:])
    else:
        both = _sets(torch.cat([dg, g], 1), shape)
        w = torch.cat([_tiled(m.weight, rows, shape.repeated).view(rows, *m.weight.shape), dw], 1)
        w = w.reshape(rows * w.shape[1], *w.shape[2:])
    gi = torch.ops.aten.convolution_backward(both, _sets(a, shape), w, None, m.stride, m.padding, m.dilation, False,
                                             (0, 0), rows, (True, False, False))[0]
    return _unsets(gi, shape)


def _affine(m):
    c = m.num_features
    if m.weight is None:
        return None, None
    return m.weight.view(1, c, 1, 1), m.bias.view(1, c, 1, 1)


def _bn_stats(t, shape):
    """A view of rows·B × C × H × W as statistics groups × per_stats × C × H·W, and the dimensions reduced."""
    return shape.by_stats(t), shape.stats_dims


def _batch_norm_forward(m, a, shape):
    gamma, beta = _affine(m)
    kept = {"batch": m.training or m.running_mean is None, "v": None, "gamma": gamma}  # the other passes' γ view
    if kept["batch"] and (v := _native(a, shape)) is not None:
        xhat, mean, rstd = torch.native_batch_norm(v, None, None, None, None, True, 0.0, m.eps)
        kept.update(v=v, xv=xhat, mean=mean, count=v.numel() // rstd.numel())
        xhat = xhat.view(a.shape)
    elif kept["batch"]:
        v, dims = _bn_stats(a, shape)
        centred = v - v.mean(dims, keepdim=True)
        rstd = torch.rsqrt((centred * centred).mean(dims, keepdim=True) + m.eps)
        xs = centred * rstd
        kept.update(xs=xs, dims=dims)
        xhat = xs.reshape(a.shape)
    else:
        rstd = torch.rsqrt(m.running_var + m.eps).view(1, -1, 1, 1)
        xhat = (a - m.running_mean.view(1, -1, 1, 1)) * rstd
    kept.update(xhat=xhat, rstd=rstd)
    out = xhat if gamma is None else torch.addcmul(beta, xhat, gamma)
    return out, kept


def _batch_norm_backward(m, g, saved, shape, wanted, need_input):
    kept = saved[2]
    xhat, rstd = kept["xhat"], kept["rstd"]
    gamma = kept["gamma"]
    grads = {}
    if not kept["batch"]:
        if "weight" in wanted:
            grads["weight"] = shape.by_row(g * xhat).sum((1, 3, 4))
        if "bias" in wanted:
            grads["bias"] = shape.by_row(g).sum((1, 3, 4))
        return ((g if gamma is None else g * gamma) * rstd if need_input else None), grads
    if kept["v"] is not None:
        rq, sums_x, sums = _native_backward(_native(g, shape), kept, (True, True, True))
        if "weight" in wanted:
            grads["weight"] = _row_sums(sums_x, shape, g.shape[1])
        if "bias" in wanted:
            grads["bias"] = _row_sums(sums, shape, g.shape[1])
        kept.update(c=sums_x / kept["count"], rq=rq)  # for the backward tangent
        if not need_input:
            return None, grads
        return (rq.view(g.shape) if gamma is None else rq.view(g.shape) * gamma), grads
    xs, dims = kept["xs"], kept["dims"]
    gs = shape.by_stats(g)
    c, mean = (gs * xs).mean(dims, keepdim=True), gs.mean(dims, keepdim=True)
    count = g.numel() // c.numel()  # values per statistic: a row's sums are its groups' means times this
    if "weight" in wanted:
        grads["weight"] = (c * count).reshape(shape.rows, -1, g.shape[1]).sum(1)
    if "bias" in wanted:
        grads["bias"] = (mean * count).reshape(shape.rows, -1, g.shape[1]).sum(1)
    q = torch.addcmul(gs - mean, xs, c, value=-1)  # P(g), kept for the backward tangent
    kept.update(q=q, c=c)
    if not need_input:
        return None, grads
    scale = rstd if gamma is None else gamma.view(1, 1, -1, 1) * rstd
    return (scale * q).reshape(g.shape), grads


def _batch_norm_tangent(m, da, saved, shape, dtheta):
    """ȯut = γ̇ x̂ + γ ẋ + β̇ with ẋ = rstd P(ż) (batch statistics) or rstd ż (running ones)."""
    kept = saved[2]
    xhat, rstd = kept["xhat"], kept["rstd"]
    gamma, db = kept["gamma"], dtheta["bias"]
    out = None
    if da is not None:
        if kept["v"] is not None:
            dxv, sums_x, _ = _native_backward(_native(da, shape), kept, (True, True, False))
            kept.update(dxv=dxv, drstd_rstd=sums_x * (rstd / -kept["count"]))  # ṙstd / rstd, for the backward tangent
            dx = dxv.view(da.shape)
        elif kept["batch"]:
            xs, dims = kept["xs"], kept["dims"]
            zs = shape.by_stats(da)
            zx = (zs * xs).mean(dims, keepdim=True)
            dxs = torch.addcmul(zs - zs.mean(dims, keepdim=True), xs, zx, value=-1).mul_(rstd)  # rstd P(ż)
            kept.update(dxs=dxs, drstd=-rstd * rstd * zx)  # for the backward tangent
            dx = dxs.reshape(da.shape)
        else:
            dx = da * rstd
        if gamma is not None and db is not None:  # β̇ + γ ẋ in one operation
            out, db = torch.addcmul(_per_image(db, shape), dx, gamma), None
        else:
            out = dx if gamma is None else dx * gamma
    if db is not None:
        out = _add(out, _per_image(db, shape))
    if dtheta["weight"] is not None:
        dgamma = _per_image(dtheta["weight"], shape)
        out = xhat * dgamma if out is None else torch.addcmul(out, xhat, dgamma)
    return out


def _batch_norm_backward_tangent(m, dg, g, saved, da, shape, dtheta):
    """The tangent of g_in = γ rstd P(g) (batch statistics; with x̂, rstd and P moving with ż) or γ rstd g."""
    kept = saved[2]
    rstd = kept["rstd"]
    gamma = kept["gamma"]
    dgamma = None if dtheta["weight"] is None else _per_image(dtheta["weight"], shape)
    if not kept["batch"]:
        out = None if dg is None else dg * rstd * (1 if gamma is None else gamma)
        return out if dgamma is None else _add(out, g * rstd * dgamma)
    if kept["v"] is not None:
        return _native_backward_tangent(m, dg, g, kept, da, shape, dtheta)
    xs, dims, q, c = kept["xs"], kept["dims"], kept["q"], kept["c"]
    # d(g_in) = γ rstd q̇ + (γ ṙstd + γ̇ rstd) q, with q = P(g) and
    # q̇ = P(ġ) - ẋ c - x̂ mean(g ẋ) = ġ - mean ġ - ẋ c - x̂ (mean(ġ x̂) + mean(g ẋ))
    scale = 1 if gamma is None else gamma.view(1, 1, -1, 1)
    dq, k, coef = None, None, None
    if dg is not None:
        ds = shape.by_stats(dg)
        dq = ds - ds.mean(dims, keepdim=True)
        k = (ds * xs).mean(dims, keepdim=True)
    if da is not None:  # the statistics move with ż: ẋ and ṙstd from the forward tangent
        dxs = kept["dxs"]
        k = _add(k, (shape.by_stats(g) * dxs).mean(dims, keepdim=True))
        dq = dxs * (-c) if dq is None else torch.addcmul(dq, dxs, c, value=-1)
        coef = scale * kept["drstd"]
    if k is not None:
        dq = torch.addcmul(dq, xs, k, value=-1)
    if dgamma is not None:
        coef = _add(coef, shape.by_stats(dgamma) * rstd)
    out = None if dq is None else dq * (scale * rstd)
    if coef is not None:
        out = q * coef if out is None else torch.addcmul(out, q, coef)
    return None if out is None else out.reshape(g.shape)


def _native(t: torch.Tensor, shape: _Shape) -> torch.Tensor | None:
    """rows·B × C × H × W laid out for torch's own BatchNorm kernels, which keep statistics per channel over
    N × H × W: 1 × rows·B·C × H × W when every candidate has its own statistics, the tensor itself when all share
    one group, None for several groups of several candidates (the general path then). The kernels' x̂ was closer
    to float64's than the two-pass one above (6e-6 against 1.1e-5 at mean 3, deviation 0.05)."""
    if shape.per_stats == 1:
        return t.view(1, t.shape[0] * t.shape[1], *t.shape[2:])
    if t.shape[0] == shape.per_stats:
        return t
    return None


def _native_backward(t: torch.Tensor, kept: dict, mask, weight: torch.Tensor | None = None) -> tuple:
    """torch's BatchNorm backward of ``t`` (``_native`` layout): weight · rstd P(t) (no weight: 1), Σ t x̂ and
    Σ t per statistic, those ``mask`` asks for. One kernel for what is otherwise about ten operations."""
    return torch.ops.aten.native_batch_norm_backward(t, kept["v"], weight, None, None, kept["mean"], kept["rstd"],
                                                     True, 0.0, list(mask))


def _row_sums(t: torch.Tensor, shape: _Shape, channels: int) -> torch.Tensor:
    """Per-statistic values (``_native`` layout) summed per row: rows × C."""
    t = t.view(shape.rows, -1, channels)
    return t[:, 0] if t.shape[1] == 1 else t.sum(1)


def _per_statistic(t: torch.Tensor | None, shape: _Shape) -> torch.Tensor | None:
    """rows × C per-set values (a weight or its tangent) as one value per statistic of the ``_native`` layout."""
    if t is None:
        return None
    if shape.per_stats == 1 and shape.per_row > 1:
        t = t.repeat_interleave(shape.per_row, 0)
    return t.reshape(-1)


def _native_backward_tangent(m, dg, g, kept, da, shape, dtheta):
    """``_batch_norm_backward_tangent`` on torch's kernels: with q = P(g), c = mean(g x̂) and ẋ the forward tangent,
    d(g_in) = γ rstd (P(ġ) - c ẋ - mean(g ẋ) x̂) + (γ ṙstd + γ̇ rstd) q, the first term one kernel, the rest
    per-statistic coefficients times what the other passes kept (rstd q among them)."""
    rstd = kept["rstd"]
    gamma = None if m.weight is None else _tiled(m.weight, rstd.numel() // m.num_features, shape.repeated)
    scale = rstd if gamma is None else gamma * rstd
    out = None  # a new tensor of this function's, summed into in place
    if dg is not None:
        out = _native_backward(_native(dg, shape), kept, (True, False, False), gamma)[0]  # γ rstd P(ġ)
    coef = _per_statistic(dtheta["weight"], shape)  # γ̇ rstd q = γ̇ (rstd q)
    if da is not None:
        dxv = kept["dxv"]
        k = (_native(g, shape) * dxv).sum((0, 2, 3)).mul_(-1 / kept["count"])  # -mean(g ẋ)
        along = (scale * kept["c"]).neg_().view(1, -1, 1, 1)
        out = dxv * along if out is None else out.addcmul_(dxv, along)
        out.addcmul_(kept["xv"], k.mul_(scale).view(1, -1, 1, 1))
        ratio = kept["drstd_rstd"]
        coef = _add(coef, ratio if gamma is None else gamma * ratio)
    if coef is not None:
        coef = coef.view(1, -1, 1, 1)
        out = kept["rq"] * coef if out is None else out.addcmul_(kept["rq"], coef)
    return None if out is None else out.view(g.shape)


def _relu_forward(m, a, shape):
    return F.relu(a), None


def _relu_backward(m, g, saved, shape, wanted, need_input):
    return (torch.ops.aten.threshold_backward(g, saved[1], 0) if need_input else None), {}


def _relu_tangent(m, da, saved, shape, dtheta):
    return None if da is None else torch.ops.aten.threshold_backward(da, saved[1], 0)


def _relu_backward_tangent(m, dg, g, saved, da, shape, dtheta):
    return None if dg is None else torch.ops.aten.threshold_backward(dg, saved[1], 0)


def _pool_forward(m, a, shape):  # to 1 × 1 only: ``LayerwiseGradients.build`` refuses other sizes
    return a.mean((2, 3), keepdim=True), None


def _pool_backward(m, g, saved, shape, wanted, need_input):
    a = saved[0]
    return ((g / (a.shape[2] * a.shape[3])).expand(a.shape) if need_input else None), {}


def _pool_tangent(m, da, saved, shape, dtheta):
    return None if da is None else da.mean((2, 3), keepdim=True)


def _pool_backward_tangent(m, dg, g, saved, da, shape, dtheta):
    a = saved[0]
    return None if dg is None else (dg / (a.shape[2] * a.shape[3])).expand(a.shape)


def _flatten_forward(m, a, shape):
    return a.flatten(1), None


def _flatten_backward(m, g, saved, shape, wanted, need_input):
    return (g.reshape(saved[0].shape) if need_input else None), {}


def _flatten_tangent(m, da, saved, shape, dtheta):
    return None if da is None else da.flatten(1)


def _flatten_backward_tangent(m, dg, g, saved, da, shape, dtheta):
    return None if dg is None else dg.reshape(saved[0].shape)


def _linear_forward(m, a, shape):
    if a.dim() != 2:
        raise Unsupported(f"a Linear layer applied to {a.dim()}-D activations")
    return F.linear(a, m.weight, m.bias), None


def _linear_backward(m, g, saved, shape, wanted, need_input):
    return layerwise._linear_backward(m, g, saved[0], shape, wanted, need_input)


def _linear_tangent(m, da, saved, shape, dtheta):
    a = saved[0]
    out = None if da is None else F.linear(da, m.weight)
    if dtheta["weight"] is not None:
        out = _add(out, torch.bmm(shape.by_row(a), dtheta["weight"].transpose(1, 2)).reshape(a.shape[0], -1))
    if dtheta["bias"] is not None:
        b = dtheta["bias"]
        out = _add(out, b.repeat_interleave(shape.per_row, 0) if shape.per_row > 1 else b)
    return out


def _linear_backward_tangent(m, dg, g, saved, da, shape, dtheta):
    out = None if dg is None else dg @ m.weight
    if dtheta["weight"] is not None:
        out = _add(out, torch.bmm(shape.by_row(g), dtheta["weight"]).reshape(g.shape[0], -1))
    return out


def _identity_forward(m, a, shape):
    return a, None


def _identity_backward(m, g, saved, shape, wanted, need_input):
    return (g if need_input else None), {}


def _identity_tangent(m, da, saved, shape, dtheta):
    return da


def _identity_backward_tangent(m, dg, g, saved, da, shape, dtheta):
    return dg


_FORWARD = {nn.Conv2d: _conv_forward, nn.BatchNorm2d: _batch_norm_forward, nn.ReLU: _relu_forward,
            nn.AdaptiveAvgPool2d: _pool_forward, nn.Flatten: _flatten_forward, nn.Linear: _linear_forward,
            nn.Identity: _identity_forward}
_BACKWARD = {nn.Conv2d: _conv_backward, nn.BatchNorm2d: _batch_norm_backward, nn.ReLU: _relu_backward,
             nn.AdaptiveAvgPool2d: _pool_backward, nn.Flatten: _flatten_backward, nn.Linear: _linear_backward,
             nn.Identity: _identity_backward}
_TANGENT = {nn.Conv2d: _conv_tangent, nn.BatchNorm2d: _batch_norm_tangent, nn.ReLU: _relu_tangent,
            nn.AdaptiveAvgPool2d: _pool_tangent, nn.Flatten: _flatten_tangent, nn.Linear: _linear_tangent,
            nn.Identity: _identity_tangent}
_BACKWARD_TANGENT = {nn.Conv2d: _conv_backward_tangent, nn.BatchNorm2d: _batch_norm_backward_tangent,
                     nn.ReLU: _relu_backward_tangent, nn.AdaptiveAvgPool2d: _pool_backward_tangent,
                     nn.Flatten: _flatten_backward_tangent, nn.Linear: _linear_backward_tangent,
                     nn.Identity: _identity_backward_tangent}
