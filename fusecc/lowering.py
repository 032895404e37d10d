"""How each fused op runs: the functions the fused graph calls at run time.

This is the one replaceable place for lowerings. A rule (fusecc/rules/) decides *what* a node becomes and
where the model dimension sits; the functions here decide *how* it is computed (bmm vs a wide GEMM,
grouped conv, ...). They use aten ops only, so a fused module runs on any device, exports to TorchScript
and torch.export, and serves as the reference for the Triton kernels.

Shapes use N for the number of models. A "stacked" parameter is ``[N, *per_model_shape]``; a "folded"
activation merges the model dim into a per-model dim, model-major (``[B, N*C, H, W]``).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair
from torch.utils.weak import WeakIdKeyDictionary

from fusecc.kernels import conv1x1 as kernels_conv1x1
from fusecc.kernels import layer_norm as kernels_layer_norm
from fusecc.kernels import linear as kernels_linear

def pack(kind: str, items: List[Any]) -> Any:
    """A container of the fused results: ``kind`` "tuple", "list", or a ``torch.return_types`` name (``"sort"``), so
    an op's named result keeps its fields (``.values``, ``.indices``)."""
    if kind == "tuple":
        return tuple(items)
    if kind == "list":
        return list(items)
    return getattr(torch.return_types, kind)(items)


def index_select_per_model(x: Tensor, dim: int, index: Tensor) -> Tensor:
    """``x [N, ...]`` indexed along ``dim`` (a tensor dim, > 0) by a per-model ``index [N, K]`` (or ``[N]``, a 0-dim
    index per model): model n gets ``x[n].index_select(dim - 1, index[n])``, as one gather."""
    n = x.shape[0]
    idx = index.reshape(n, -1)
    view = [n] + [1] * (x.dim() - 1)
    view[dim] = idx.shape[1]
    out_shape = list(x.shape)
    out_shape[dim] = idx.shape[1]
    return torch.gather(x, dim, idx.reshape(view).expand(out_shape))


def narrow_per_model(x: Tensor, dim: int, start: Tensor, length: int) -> Tensor:
    """``x [N, ...]`` narrowed along ``dim`` (a tensor dim, > 0) from a per-model ``start [N]``: model n gets
    ``x[n].narrow(dim - 1, start[n], length)``, as one gather."""
    start = start.reshape(-1)
    start = torch.where(start < 0, start + x.shape[dim], start)
    return index_select_per_model(x, dim, start[:, None] + torch.arange(length, device=x.device, dtype=start.dtype))


def broadcast_copy(x: Tensor, src: Tensor) -> Tensor:
    """What ``x.copy_(src)`` (or ``x.fill_(src)``) leaves in a shared ``x`` for per-model ``src``: src broadcast to the
    joint shape, in x's dtype, as a new tensor (the shared x itself is not written)."""
    return src.to(x.dtype).expand(torch.broadcast_shapes(x.shape, src.shape)).clone()


# ----------------------------------------------------------------------------------------------------------------
# linear family


def batched_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: str = "none", impl: str = "bmm") -> Tensor:
    """Per-model linear: ``y[n] = act(x[n] @ weight[n]^T + bias[n])``.

    x ``[N, *, K]``, weight ``[N, M, K]``, bias ``[N, M]`` or None -> ``[N, *, M]``. ``impl`` "bmm": the Triton kernel
    on CUDA (bias and activation in its epilogue), ``baddbmm`` elsewhere (fusecc.kernels.linear); "loop": N
    ``F.linear`` calls, stacked (fusecc/choose.py picks it per layer when it measures faster).
    """
    if impl == "loop":
        # unbind, not x[i]: the backward of N unbinds is one stack, of N indexings N full-size scatters
        bs = [None] * weight.shape[0] if bias is None else bias.unbind(0)
        y = torch.stack([F.linear(xi, wi, bi) for xi, wi, bi in zip(x.unbind(0), weight.unbind(0), bs)])
        return kernels_linear.reference.activation_(y, act)
    return kernels_linear.batched_linear(x, weight, bias, act)


def wide_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: str = "none") -> Tensor:
    """N linears on one shared input as ONE GEMM with the N weights concatenated.

    x ``[*, K]`` (the same for every model), weight ``[N, M, K]``, bias ``[N, M]`` -> ``[*, N*M]`` (model-major).
    """
    return kernels_linear.wide_linear(x, weight, bias, act)


# ----------------------------------------------------------------------------------------------------------------
# convolution family


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
    if (nd == 2 and tuple(weight.shape[-2:]) == (1, 1) and _all_eq(padding, 0) and _all_eq(dilation, 1)
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
            t is not None and t.requires_grad for t in (x, weight, bias))) and not _tracing():
        # write the GEMM straight into the channels-last output (no transposing copy), as aten's out= allows
        out = x.new_empty((rows, n, m))
        if kernels_linear.cpu.applies(cols, wmat, bias):
            kernels_linear.cpu.small_gemm(cols, wmat, bias, out=out.transpose(0, 1))  # few pixels: weight-bound
        elif bias is None:
            torch.bmm(cols, wmat.transpose(1, 2), out=out.transpose(0, 1))
        else:
            torch.baddbmm(bias.unsqueeze(1), cols, wmat.transpose(1, 2), out=out.transpose(0, 1))
        y = out
    else:
        y = kernels_linear.batched_linear(cols, wmat, bias).transpose(0, 1)  # [rows, N, M] view
    return y.reshape(b, oh, ow, n * m).permute(0, 3, 1, 2)


_DERIVED = WeakIdKeyDictionary()  # parameter -> {key: (stamp, derived tensor)}


def _tracing() -> bool:
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()


def derived_weight(w: Tensor, key: tuple, fn: Any) -> Tensor:
    """``fn(w)``, a re-laid-out copy of a parameter (its live taps, say), kept while ``w`` is unchanged.

    Kept only where nothing can differentiate through it (grad mode off) and ``w`` is a real tensor (not fake, not
    traced): an in-place update (an optimizer step, ``load_state_dict``) bumps ``w._version`` and the next call
    makes it anew; the entry goes when ``w`` does. With grad on, ``fn(w)`` runs every call, inside autograd.
    """
    # _tracing() first: torch.compile breaks the graph at w.is_inference() (an inference tensor has no version
    # counter to watch)
    if _tracing() or torch.is_grad_enabled() or type(w) not in (Tensor, torch.nn.Parameter) or w.is_inference():
        return fn(w)
    stamp = (w._version, w.data_ptr(), tuple(w.shape), w.stride(), w.dtype, w.device)
    entries = _DERIVED.get(w)
    if entries is None:
        entries = _DERIVED[w] = {}
    hit = entries.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    out = fn(w.detach())
    entries[key] = (stamp, out)
    return out


def _all_eq(v: Any, value: int) -> bool:
    return all(e == value for e in v) if isinstance(v, (tuple, list)) else v == value


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


# ----------------------------------------------------------------------------------------------------------------
# shapes


def cat_folded(xs: List[Tensor], n: int, d: int) -> Tensor:
    """Per-model cat of folded tensors along their folded dim d (``[.., N*C_i, ..]`` -> ``[.., N*sum(C_i), ..]``):
    model n's channels of every input, then the next model's. Channels-last inputs (``[B, N*C, H, W]`` whose
    channels are the innermost dim in memory, as the convs and the GEMM convs write them) give a channels-last
    output, so the convs that read it need no copy; anything else is concatenated in its logical (NCHW) order."""
    if d == 1 and all(x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) for x in xs):
        parts = [x.permute(0, 2, 3, 1).unflatten(3, (n, -1)) for x in xs]  # [B, H, W, N, C_i] views
        return torch.cat(parts, 4).flatten(3).permute(0, 3, 1, 2)
    return torch.cat([x.unflatten(d, (n, -1)) for x in xs], d + 1).flatten(d, d + 1)


# ----------------------------------------------------------------------------------------------------------------
# normalisation


def batch_norm(
    x: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    training: bool,
    momentum: Optional[float],
    eps: float,
    num_batches_tracked: Optional[Tensor],
) -> Tensor:
    """BatchNorm of N models on a folded input ``[B, N*C, *]``; stats and affine are stacked ``[N, C]``.

    Statistics are per channel of ``N*C``, so they never mix models; running stats are updated in place through
    views of the stacked buffers. Mirrors ``torch.nn.modules.batchnorm._BatchNorm.forward``.
    """
    eaf = 0.0 if momentum is None else momentum
    if training and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        if momentum is None:
            eaf = 1.0 / float(num_batches_tracked[0])
    bn_training = training or (running_mean is None and running_var is None)
    # in training the running statistics are updated through views of the stacked buffers (view, never a copy);
    # in eval they are only read, and may be a shared tensor broadcast to [N, C] (reshape copies it)
    flat = (lambda t: t.view(-1)) if bn_training else (lambda t: t.reshape(-1))
    return F.batch_norm(
        x,
        None if running_mean is None else flat(running_mean),
        None if running_var is None else flat(running_var),
        None if weight is None else weight.reshape(-1),
        None if bias is None else bias.reshape(-1),
        bn_training,
        eaf,
        eps,
    )


def instance_norm(
    x: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    use_input_stats: bool,
    momentum: float,
    eps: float,
) -> Tensor:
    """InstanceNorm of N models on a folded input ``[B, N*C, *]``."""
    return F.instance_norm(
        x,
        None if running_mean is None else running_mean.view(-1),
        None if running_var is None else running_var.view(-1),
        None if weight is None else weight.reshape(-1),
        None if bias is None else bias.reshape(-1),
        use_input_stats,
        momentum,
        eps,
    )


def group_norm(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    """GroupNorm of N models on a folded input ``[B, N*C, *]`` as ONE group norm with ``N*G`` groups."""
    return F.group_norm(
        x,
        num_groups,
        None if weight is None else weight.reshape(-1),
        None if bias is None else bias.reshape(-1),
        eps,
    )


def affine(y: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    """``y * weight + bias`` with weight/bias already viewed to broadcast per model (None = absent)."""
    if weight is not None and bias is not None:
        return torch.addcmul(bias, y, weight)
    if weight is not None:
        return y * weight
    if bias is not None:
        return y + bias
    return y


def layer_norm(
    x: Tensor,
    normalized_shape: List[int],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    affine_shape: List[int],
) -> Tensor:
    """LayerNorm with per-model affine: normalise (no affine), then ``addcmul`` with weight viewed as affine_shape.

    Over the last dim with a stacked x (model dim at ``md``), fusecc.kernels.layer_norm does both in one pass on
    ``[N, *, D]`` strided views (the Triton kernel on CUDA; this same normalise-then-addcmul elsewhere).
    """
    n, md = affine_shape[0], x.dim() - len(affine_shape)
    if len(normalized_shape) == 1 and md >= 0 and x.shape[md] == n and all(s == 1 for s in affine_shape[1:-1]):
        y = kernels_layer_norm.layer_norm(
            x.movedim(md, 0), None if weight is None else weight.reshape(n, -1),
            None if bias is None else bias.reshape(n, -1), eps,
        )
        return y.movedim(0, md)
    y = F.layer_norm(x, normalized_shape, None, None, eps)
    return affine(
        y,
        None if weight is None else weight.reshape(affine_shape),
        None if bias is None else bias.reshape(affine_shape),
    )


def rms_norm(
    x: Tensor, normalized_shape: List[int], weight: Optional[Tensor], eps: Optional[float], affine_shape: List[int]
) -> Tensor:
    """RMSNorm with per-model weight viewed as affine_shape."""
    y = F.rms_norm(x, normalized_shape, None, eps)
    return y if weight is None else y * weight.reshape(affine_shape)


# ----------------------------------------------------------------------------------------------------------------
# embedding


def stacked_embedding(
    idx: Tensor,
    weight: Tensor,
    padding_idx: Optional[int],
    idx_stacked: bool,
    scale_grad_by_freq: bool,
    sparse: bool,
    max_norm: Optional[float] = None,
    norm_type: float = 2.0,
) -> Tensor:
    """Per-model embedding tables ``[N, V, D]`` looked up as ONE table ``[N*V, D]`` with per-model offsets.

    idx is ``[N, *]`` (idx_stacked) or shared ``[*]``; the result is ``[N, *, D]``. With a padding_idx the looked-up
    padding rows get no gradient (as in ``F.embedding``), for every model. With ``max_norm`` the rows looked up are
    renormalised in place in the stacked table (a view of it: each model's own rows), as ``F.embedding`` does.
    """
    n, v, _ = weight.shape
    if not idx_stacked:
        idx = idx.unsqueeze(0)
    offsets = torch.arange(n, device=idx.device, dtype=idx.dtype).view([n] + [1] * (idx.dim() - 1)) * v
    table = weight.view(n * v, -1) if max_norm is not None else weight.flatten(0, 1)  # view: renorm writes through
    out = F.embedding(idx + offsets, table, None, max_norm, norm_type, scale_grad_by_freq, sparse)
    if padding_idx is not None:
        keep = (idx != padding_idx).unsqueeze(-1)
        out = torch.where(keep, out, out.detach())
    return out


# ----------------------------------------------------------------------------------------------------------------
# shapes


def model_size(x: Tensor, kind: str, dim: int, n: int) -> torch.Size:
    """The per-model ``x.size()`` of a fused value (kind 'S': model dim at ``dim``; 'F': folded into ``dim``)."""
    s = list(x.shape)
    if kind == "S":
        del s[dim]
    else:
        s[dim] = s[dim] // n
    return torch.Size(s)


def expand_model(x: Tensor, dim: int, n: int) -> Tensor:
    """Give a shared value a model dim of size n at ``dim`` (a broadcast view, no copy)."""
    x = x.unsqueeze(dim)
    sizes = [-1] * x.dim()
    sizes[dim] = n
    return x.expand(sizes)


# ----------------------------------------------------------------------------------------------------------------
# attention


def _mha_proj(x: Tensor, w: Tensor, b: Optional[Tensor], stacked: bool) -> Tensor:
    # x: [N, B, T, E] (stacked) or [B, T, E] (shared); w [N, M, E] -> [N, B, T, M]
    if stacked:
        return batched_linear(x, w, b)
    y = wide_linear(x, w, b)  # [B, T, N*M]
    return y.unflatten(-1, (w.shape[0], -1)).permute(2, 0, 1, 3)


def multi_head_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    q_stacked: bool,
    k_stacked: bool,
    v_stacked: bool,
    num_heads: int,
    in_proj_weight: Optional[Tensor],
    in_proj_bias: Optional[Tensor],
    q_proj_weight: Optional[Tensor],
    k_proj_weight: Optional[Tensor],
    v_proj_weight: Optional[Tensor],
    bias_k: Optional[Tensor],
    bias_v: Optional[Tensor],
    add_zero_attn: bool,
    out_proj_weight: Tensor,
    out_proj_bias: Optional[Tensor],
    dropout_p: float,
    key_padding_mask: Optional[Tensor],
    need_weights: bool,
    attn_mask: Optional[Tensor],
    average_attn_weights: bool,
    is_causal: bool,
    batch_first: bool,
    kpm_stacked: bool,
    mask_stacked: bool,
) -> Tuple[Tensor, Optional[Tensor]]:
    """``nn.MultiheadAttention`` (batch_first layout) for N models with stacked weights.

    query ``[N, B, T, E]`` when q_stacked else shared ``[B, T, E]`` (same for key/value, length S). Masks are shared
    (``attn_mask`` ``[T, S]`` or ``[B*H, T, S]``, ``key_padding_mask`` ``[B, S]``) or stacked (a leading N, flagged by
    kpm_stacked / mask_stacked). Returns ``([N, B, T, E],
    [N, B, T, S] | [N, B, H, T, S] | None)``. The model dim is folded into the batch for the attention itself.
    """
    if not batch_first:  # [.., T, B, E] -> [.., B, T, E]
        query, key, value = query.transpose(-3, -2), key.transpose(-3, -2), value.transpose(-3, -2)
    e = out_proj_weight.shape[-1]
    n = out_proj_weight.shape[0]
    if in_proj_weight is not None:
        wq, wk, wv = in_proj_weight.split(e, dim=1)
        bq, bk, bv = (None, None, None) if in_proj_bias is None else in_proj_bias.split(e, dim=1)
    else:
        assert q_proj_weight is not None and k_proj_weight is not None and v_proj_weight is not None
        wq, wk, wv = q_proj_weight, k_proj_weight, v_proj_weight
        bq, bk, bv = (None, None, None) if in_proj_bias is None else in_proj_bias.split(e, dim=1)
    q = _mha_proj(query, wq, bq, q_stacked)
    k = _mha_proj(key, wk, bk, k_stacked)
    v = _mha_proj(value, wv, bv, v_stacked)
    bsz = q.shape[1]
    if bias_k is not None and bias_v is not None:  # [N, 1, 1, E] appended as one more key position
        k = torch.cat([k, bias_k.reshape(n, 1, 1, e).expand(n, bsz, 1, e)], dim=2)
        v = torch.cat([v, bias_v.reshape(n, 1, 1, e).expand(n, bsz, 1, e)], dim=2)
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))
    if add_zero_attn:
        k = torch.cat([k, k.new_zeros((n, bsz, 1, e))], dim=2)
        v = torch.cat([v, v.new_zeros((n, bsz, 1, e))], dim=2)
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))
    h = num_heads
    t, s = q.shape[2], k.shape[2]
    hd = e // h
    # [N, B, T, E] -> [N*B, H, T, hd]
    q = q.reshape(n * bsz, t, h, hd).transpose(1, 2)
    k = k.reshape(n * bsz, s, h, hd).transpose(1, 2)
    v = v.reshape(n * bsz, s, h, hd).transpose(1, 2)
    # one additive mask [N, B, H, T, S] from the pieces, each viewed to broadcast against it
    mask: Optional[Tensor] = None
    if attn_mask is not None:
        am = attn_mask
        if am.dtype == torch.bool:
            am = torch.zeros_like(am, dtype=q.dtype).masked_fill(am, float("-inf"))
        lead = n if mask_stacked else 1
        full = am.dim() - (1 if mask_stacked else 0) == 3  # [B*H, T, S] per model
        mask = am.view(lead, bsz, h, t, s) if full else am.view(lead, 1, 1, t, s)
    if key_padding_mask is not None:
        kp = key_padding_mask
        if kp.dtype == torch.bool:
            kp = torch.zeros_like(kp, dtype=q.dtype).masked_fill(kp, float("-inf"))
        kp = kp.view(n if kpm_stacked else 1, bsz, 1, 1, s)
        mask = kp if mask is None else mask + kp
    if mask is not None:
        mask = mask.expand(n, bsz, h, t, s).reshape(n * bsz, h, t, s)
    if not need_weights:
        out = F.scaled_dot_product_attention(q, k, v, mask, dropout_p, is_causal and mask is None)
        weights = None
    else:
        scores = torch.matmul(q * (float(hd) ** -0.5), k.transpose(-2, -1))
        if is_causal and mask is None:
            causal = torch.ones(t, s, dtype=torch.bool, device=q.device).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
        if mask is not None:
            scores = scores + mask
        attn = torch.softmax(scores, dim=-1)
        weights = attn.reshape(n, bsz, h, t, s)
        weights = weights.mean(dim=2) if average_attn_weights else weights
        if dropout_p > 0.0:
            attn = F.dropout(attn, p=dropout_p)
        out = torch.matmul(attn, v)
    out = out.transpose(1, 2).reshape(n, bsz, t, e)
    out = batched_linear(out, out_proj_weight, out_proj_bias)
    if not batch_first:
        out = out.transpose(1, 2)
    return out, weights


def sdpa(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor],
    dropout_p: float,
    is_causal: bool,
    scale: Optional[float],
    enable_gqa: bool,
) -> Tensor:
    """``F.scaled_dot_product_attention`` on stacked ``[N, *batch, L, E]`` operands (mask ``[N, *, L, S]``).

    With a batch dim, N is folded into it (``[N*B, H, L, E]``), the shape the fused CPU/GPU kernels take.
    """
    if query.dim() >= 4 and key.shape[:-2] == query.shape[:-2] and value.shape[:-2] == query.shape[:-2]:
        lead = (query.shape[0], query.shape[1])
        m = attn_mask
        if m is not None:
            m = m.expand(tuple(query.shape[:-2]) + tuple(m.shape[-2:])).flatten(0, 1)
        out = F.scaled_dot_product_attention(
            query.flatten(0, 1), key.flatten(0, 1), value.flatten(0, 1), m, dropout_p, is_causal, scale=scale,
            enable_gqa=enable_gqa,
        )
        return out.unflatten(0, lead)
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
    )


# ----------------------------------------------------------------------------------------------------------------
# torch.vmap over the model dim (per-model indexing, and functions with no rule)


_VMAP_FNS: Dict[str, Any] = {}


def vmap_key(fn: Any) -> str:
    """A name for ``fn`` that generated code can carry (it cannot hold a function object as an argument)."""
    key = f"{getattr(fn, '__module__', None)}.{getattr(fn, '__qualname__', getattr(fn, '__name__', repr(fn)))}"
    if _VMAP_FNS.setdefault(key, fn) is not fn:
        key = f"{key}@{id(fn):x}"
        _VMAP_FNS[key] = fn
    return key


def vmap_call(fn: str, in_dims: Tuple[Any, ...], args: Tuple[Any, ...], kw_names: Tuple[str, ...] = ()) -> Any:
    """``fn(*args)`` per model: ``torch.vmap`` over dim 0 of the arguments whose in_dim is 0. The last
    ``len(kw_names)`` arguments are passed by those keywords (vmap maps positional arguments only)."""
    f = _VMAP_FNS[fn]
    k = len(kw_names)
    if not k:
        return torch.vmap(f, in_dims=in_dims)(*args)
    return torch.vmap(lambda *a: f(*a[:len(a) - k], **dict(zip(kw_names, a[len(a) - k:]))), in_dims=in_dims)(*args)


# ----------------------------------------------------------------------------------------------------------------
# the per-model loop (fallback for modules with no rule)


def loop_module(
    template: torch.nn.Module,
    names: List[str],
    stacked: List[Tensor],
    args: List[Any],
    per_model: List[bool],
    kwargs: Dict[str, Any],
    kw_per_model: Dict[str, bool],
    n: int,
) -> Any:
    """Run ``template`` once per model with model i's slice of every stacked parameter/buffer and input.

    args[j] is ``[N, *]`` where per_model[j] (sliced), else passed to every model as is (same for kwargs). Tensor
    outputs are stacked on a new leading dim; non-tensor outputs are model 0's.
    """
    from torch.func import functional_call
    from torch.utils._pytree import tree_flatten, tree_unflatten

    outs = []
    for i in range(n):
        params = {name: t[i] for name, t in zip(names, stacked)}
        a = tuple(x[i] if pm else x for x, pm in zip(args, per_model))
        k = {key: (x[i] if kw_per_model[key] else x) for key, x in kwargs.items()}
        outs.append(functional_call(template, params, a, k, strict=False, tie_weights=False))
    leaves0, spec = tree_flatten(outs[0])
    all_leaves = [tree_flatten(o)[0] for o in outs]
    merged = [
        torch.stack([lv[j] for lv in all_leaves]) if isinstance(leaves0[j], Tensor) else leaves0[j]
        for j in range(len(leaves0))
    ]
    return tree_unflatten(merged, spec)
