"""Convolutions of N models: ONE grouped conv (NCHW or channels-last), a loop of N convs, or a per-model GEMM over
the kernel taps that reach the input; transposed convs; convs whose weight every model shares."""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair

from fusecc.kernels import conv1x1 as kernels_conv1x1
from fusecc.kernels import linear as kernels_linear

from .derived import derived_weight, tracing


def stacked_conv(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    stride: Any,
    padding: Any,
    dilation: Any,
    groups: int,
    nd: int,
    impl: str = "grouped",
) -> Tensor:
    """Convolution with stacked weights ``[N, Cout, Cin/g, *k]`` as ONE conv with ``N*Cout`` output channels.

    ``groups`` is the conv's own group count: ``N*g`` for a folded input ``[B, N*Cin, *sp]`` (grouped conv,
    model n reads only its own channels) or ``g`` (=1) for a shared input ``[B, Cin, *sp]`` (wide conv).
    ``impl`` (fusecc/choose.py picks it per layer) runs the same maths as:

    - ``"grouped"``: ONE grouped conv on NCHW data;
    - ``"channels_last"``: the same conv on channels-last data (its output stays channels-last);
    - ``"loop"``: N ordinary convs over the models' channel slices, concatenated;
    - ``"gemm"`` (2d, one group per model, see ``gemm_conv_ok``): a per-model GEMM over the taps that can reach the
      input (``conv_gemm``), on channels-last data.
    """
    n = weight.shape[0]
    if impl == "loop":
        return _conv_loop(x, weight, bias, stride, padding, dilation, groups, nd)
    if impl == "gemm":
        return conv_gemm(x, weight, bias, stride, padding, dilation, groups)
    if impl == "channels_last" and x.dim() in (4, 5):
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    elif impl == "grouped":
        x = x.contiguous()
    if (nd == 2 and tuple(weight.shape[-2:]) == (1, 1) and all_equal(padding, 0) and all_equal(dilation, 1)
            and (groups == n or groups == 1) and x.dim() == 4 and not isinstance(stride, str)):
        # a 1x1 conv per model (groups = N) or of a shared input (groups = 1): the per-model GEMM kernel on CUDA,
        # this same grouped conv elsewhere (fusecc.kernels.conv1x1)
        return kernels_conv1x1.conv1x1(x, weight.flatten(2), bias, stride=stride, shared_input=groups == 1 and n > 1)
    w = weight.flatten(0, 1)
    if impl == "channels_last" and nd == 2 and not torch.is_grad_enabled():
        # oneDNN converts an NCHW weight to channels-last on every call (a copy of all N weights: 1.5 ms for
        # resnet18's layer3 convs at N=16); keep the converted one while the weight is unchanged
        w = derived_weight(weight, ("channels_last",),
                           lambda t: t.flatten(0, 1).contiguous(memory_format=torch.channels_last))
    b = None if bias is None else bias.flatten()
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    return conv(x, w, b, stride, padding, dilation, groups)


def _conv_loop(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Any, padding: Any, dilation: Any,
               groups: int, nd: int) -> Tensor:
    """N ordinary convs, model i on its channel slice of the folded x (or all of a shared x), outputs concatenated."""
    n = weight.shape[0]
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    shared = groups == 1 and n > 1
    g = 1 if shared else groups // n
    cin = x.shape[1] if shared else x.shape[1] // n
    # split/unbind, not indexing: their backward is one cat/stack, where N indexings would scatter N full-size grads
    xs = [x] * n if shared else x.split(cin, dim=1)
    bs = [None] * n if bias is None else bias.unbind(0)
    outs = [conv(xi, wi, bi, stride, padding, dilation, g) for xi, wi, bi in zip(xs, weight.unbind(0), bs)]
    return torch.cat(outs, 1)


def gemm_conv_ok(x_shape: Any, w_shape: Any, padding: Any, groups: int, nd: int) -> bool:
    """Whether ``conv_gemm`` runs this conv: 2d, every model's conv dense (one group; a shared input: groups 1)
    and numeric padding."""
    per_model_groups = 1 if groups == 1 else groups // w_shape[0]
    return nd == 2 and len(x_shape) == 4 and per_model_groups == 1 and not isinstance(padding, str)


def live_taps(size: int, k: int, s: int, p: int, d: int) -> Tuple[int, int, int, bool]:
    """(output size, first, last kernel tap that reads a real input position for some output, whether the single
    tap ``first`` reads a real position for EVERY output). Taps outside [first, last] only ever read padding, so
    they multiply zeros: dropping them is exact."""
    out = (size + 2 * p - d * (k - 1) - 1) // s + 1
    live = [t for t in range(k) if any(0 <= o * s - p + t * d < size for o in range(out))]
    if not live:  # every tap reads padding (a huge padding): keep one, the output is the bias
        return out, 0, 0, False
    first, last = live[0], live[-1]
    inside = first == last and all(0 <= o * s - p + first * d < size for o in range(out))
    return out, first, last, inside


def conv_gemm(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Any, padding: Any, dilation: Any,
              groups: int) -> Tensor:
    """A 2d per-model conv (one group per model; or a shared input, groups=1) as ONE batched GEMM.

    Only the kernel taps that can reach the input are computed (a 3x3 conv on a 1x1 map is its centre tap). When a
    single tap reads a real pixel for every output (1x1 convs, deep layers of small images) the GEMM reads the
    (subsampled) input in place through channels-last strides; otherwise the live taps are unfolded (im2col) first.
    Output: ``[B, N*Cout, Ho, Wo]`` in channels-last memory. For the small maps of deep layers this is 2-20x faster
    than oneDNN's grouped conv or a loop of N convs, which re-lay out the weights on every call.
    """
    n, m, c, kh, kw = weight.shape
    shared = groups == 1 and n > 1
    (sh, sw), (ph, pw), (dh, dw) = (_pair(v) for v in (stride, padding, dilation))
    b, _, h, w = x.shape
    oh, th0, th1, in_h = live_taps(h, kh, sh, ph, dh)
    ow, tw0, tw1, in_w = live_taps(w, kw, sw, pw, dw)
    rows = b * oh * ow
    if in_h and in_w:  # one tap, always on a real pixel: a 1x1 conv of the input read with the stride
        r0, c0 = th0 * dh - ph, tw0 * dw - pw
        xs = x[:, :, r0:r0 + (oh - 1) * sh + 1:sh, c0:c0 + (ow - 1) * sw + 1:sw]
        xl = xs.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)  # [B, oh, ow, Cin], a view
        cols = xl.reshape(rows, c) if shared else xl.reshape(rows, n, c).transpose(0, 1)  # [N, rows, C], no copy
        wmat = weight.reshape(n, m, c) if kh == kw == 1 else \
            derived_weight(weight, ("tap", th0, tw0), lambda t: t[:, :, :, th0, tw0].contiguous())
    else:
        th1 += 1
        tw1 += 1
        taps = (th1 - th0) * (tw1 - tw0)
        u = F.unfold(x, (kh, kw), (dh, dw), (ph, pw), (sh, sw))  # [B, Cin*kh*kw, L]: (channel, tap) rows
        u = u.view(b, n if not shared else 1, c, kh, kw, oh, ow)[:, :, :, th0:th1, tw0:tw1]
        cols = u.permute(1, 0, 5, 6, 2, 3, 4).reshape(u.shape[1], rows, c * taps)  # [N, rows, C*taps], one copy
        if shared:
            cols = cols[0]
        if taps == kh * kw:
            wmat = weight.reshape(n, m, c * taps)
        else:
            wmat = derived_weight(weight, ("taps", th0, th1, tw0, tw1),
                                  lambda t: t[:, :, :, th0:th1, tw0:tw1].reshape(n, m, c * taps))
    if shared:  # [rows, N*M]: channels-last already
        y = kernels_linear.wide_linear(cols, wmat, bias)
        return y.view(b, oh, ow, n * m).permute(0, 3, 1, 2)
    if x.device.type == "cpu" and not (torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, weight, bias))) and not tracing():
        # write the GEMM straight into the channels-last output (no transposing copy); the kernels pick how (the
        # CPU small-batch kernel for few pixels, where the weights' bandwidth is the cost, else baddbmm)
        out = x.new_empty((rows, n, m))
        kernels_linear.batched_linear_out(cols, wmat, bias, out.transpose(0, 1))
        y = out
    else:
        y = kernels_linear.batched_linear(cols, wmat, bias).transpose(0, 1)  # [rows, N, M] view
    return y.reshape(b, oh, ow, n * m).permute(0, 3, 1, 2)


def all_equal(v: Any, value: int) -> bool:
    """A conv argument (padding, dilation: an int, one per dim, or a string like "same") that is ``value`` in every
    dim."""
    return not isinstance(v, str) and all(e == value for e in (v if isinstance(v, (tuple, list)) else (v,)))


def stacked_conv_transpose(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    stride: Any,
    padding: Any,
    output_padding: Any,
    groups: int,
    dilation: Any,
    nd: int,
) -> Tensor:
    """Transposed conv with stacked weights ``[N, Cin, Cout/g, *k]`` on a folded input ``[B, N*Cin, *sp]``."""
    w = weight.flatten(0, 1)
    b = None if bias is None else bias.flatten()
    conv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
    return conv(x, w, b, stride, padding, output_padding, groups, dilation)


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def shared_weight_conv(x: Tensor, nd: int, transposed: bool, *args: Any, model_bias: Optional[Tensor] = None
                       ) -> Tensor:
    """An ``nd``-d conv (or transposed conv) whose weight is the same for every model, on a stacked input
    ``[N, B, C, *sp]``: N folded into the batch, one ordinary conv. ``args`` are the conv's own after the input;
    ``model_bias [N, Cout]`` is a per-model bias added to the result."""
    conv_fn = (_CONV_T if transposed else _CONV)[nd]
    if x.dim() == nd + 2:  # per-model unbatched [C, *sp]: N is the batch
        y = conv_fn(x, *args)
    else:
        n, b = x.shape[0], x.shape[1]
        y = conv_fn(x.flatten(0, 1), *args)
        y = y.reshape((n, b) + tuple(y.shape[1:]))
    if model_bias is not None:
        shape = [model_bias.shape[0]] + [1] * (y.dim() - nd - 2) + [model_bias.shape[1]] + [1] * nd
        y = y + model_bias.reshape(shape)
    return y
