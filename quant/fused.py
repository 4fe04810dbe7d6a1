"""Fused QAT convolutions: Conv2d (+BatchNorm2d) (+ReLU/ReLU6) with a fake-quantized weight.

With BN in 'simulate' mode the weight is quantized *after* scaling by the BN factor, as the
integer model will hold it, while BN itself keeps training (the standard conv-bn QAT
formulation)::

    sf  = gamma / sqrt(running_var + eps)
    y   = conv(x, wq(W * sf) / sf) (+ conv bias)      # undo the scale; BN sees a normal conv output
    out = act(bn(y))                                   # batch statistics while training

The scale is undone on the weight, not on the conv output as conv(x, wq(W * sf)) / sf: the conv is
linear in its weight, so values agree to float rounding and gradients are the same, but dividing the
output costs a pass over the activation forward and several backward (with the gradient to sf), about
half the cost of the conv and BN themselves; the weight is hundreds of times smaller.

In eval mode (or after :meth:`QATConvBnAct.freeze_bn`) BN uses its running statistics and the
result equals ``conv(x, wq(W * sf)) + folded_bias``: exactly what the integer model computes.
The output activation quantizer is *not* part of these modules; :func:`quant.prepare.prepare`
inserts it as a separate graph node so that alignment groups can share it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = ["QATConvBnAct", "QATConv", "make_act", "quantized_convs"]

# Replaces exact zeros of the BN scale (gamma == 0) so that dividing by it stays finite; such a
# channel's quantized weight is zero anyway, so its output is unaffected.
_TINY_SCALE = 1e-12


def make_act(kind: Optional[str], inplace: bool = False) -> nn.Module:
    """'relu' -> ReLU, 'relu6' -> ReLU6, None -> Identity (the activations an integer conv can clamp)."""
    if kind is None:
        return nn.Identity()
    if kind == "relu":
        return nn.ReLU(inplace=inplace)
    if kind == "relu6":
        return nn.ReLU6(inplace=inplace)
    raise ValueError(f"fused activation must be 'relu', 'relu6' or None, got {kind!r}")


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of one conv equal to bn(conv(x)) with BN's running statistics."""
    sf = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    return conv.weight * sf.reshape(-1, 1, 1, 1), (bias - bn.running_mean) * sf + bn.bias


def _quantizing(q: Optional[nn.Module]) -> bool:
    """True when ``q`` emits integers (Pow2FakeQuantize.emits_int: host-cached flags, no device sync)."""
    return q is not None and q.emits_int()


def quantize_bias(bias: Optional[torch.Tensor], in_q: Optional[nn.Module], w_q: nn.Module) -> Optional[torch.Tensor]:
    """The bias on the int32 grid ``s_in * s_w`` (round half to even, straight-through gradient): what
    the integer model adds to its int32 accumulator and what the QDQ export stores. Float when the
    input or the weight is not quantized."""
    if bias is None or not (_quantizing(in_q) and _quantizing(w_q)):
        return bias
    step = (in_q.scale().to(bias) * w_q.scale().to(bias)).reshape(-1)
    return bias + (torch.round(bias / step) * step - bias).detach()


def quantized_convs(model: nn.Module, active_only: bool = False) -> list[tuple[str, nn.Module]]:
    """(name, module) of every fused QAT conv in ``model`` (with an active weight quantizer only, if asked):
    what bias correction, learned rounding and the error report walk over."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (QATConvBnAct, QATConv))
            and (not active_only or getattr(m.weight_fake_quant, "is_active", lambda: False)())]


class _LinksInput:
    """Mixin: a reference to the quantizer of the conv's input, kept out of the module tree (it is
    registered where it lives) so state_dict keys and module names do not change."""

    _input_quant: Optional[nn.Module] = None

    def link_input_quantizer(self, q: Optional[nn.Module]) -> None:
        object.__setattr__(self, "_input_quant", q)


class QATConvBnAct(_LinksInput, nn.Module):
    """Conv2d + optional BatchNorm2d + optional ReLU/ReLU6 with a fake-quantized (folded) weight.

    Args:
        conv: the float conv (kept as ``self.conv``; its parameters stay the trained ones).
        bn: the BN that follows it, or None.
        act: 'relu', 'relu6' or None.
        weight_fq: the weight quantizer module (a ``Pow2FakeQuantize``; any module mapping a
            tensor to a tensor works), kept as ``self.weight_fake_quant``.
        bn_mode: 'simulate' (BN kept and trained, folding simulated) or 'fold' (BN folded into a
            new conv with bias now, using its running statistics; ``self.bn`` becomes None).

    Example:
        >>> fused = QATConvBnAct(block.conv, block.bn, "relu", Pow2FakeQuantize(spec, True, 16))
    """

    def __init__(self, conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d], act: Optional[str], weight_fq: nn.Module,
                 bn_mode: str = "simulate") -> None:
        super().__init__()
        if bn_mode not in ("simulate", "fold"):
            raise ValueError(f"bn_mode must be 'simulate' or 'fold', got {bn_mode!r}")
        if bn is not None and bn.num_features != conv.out_channels:
            raise ValueError(f"BN has {bn.num_features} channels but the conv gives {conv.out_channels}")
        if bn is not None and not (bn.track_running_stats and bn.affine):
            raise ValueError("BN without running statistics or affine parameters cannot be folded into a conv")
        if bn is not None and bn_mode == "fold":
            conv, bn = self._folded_conv(conv, bn), None
        self.conv = conv
        self.bn = bn
        # In place, as the float model's: the pre-activation is a temporary that neither the conv's nor
        # BN's backward reads (they keep their inputs), and an out-of-place ReLU costs a new tensor per call.
        self.act = make_act(act, inplace=True)
        self.weight_fake_quant = weight_fq
        self.bn_mode = bn_mode
        self.bn_frozen = False

    @staticmethod
    @torch.no_grad()
    def _folded_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
        new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                        conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode)
        new = new.to(device=conv.weight.device, dtype=conv.weight.dtype)
        weight, bias = _fold(conv, bn)
        new.weight.copy_(weight)
        new.bias.copy_(bias)
        return new

    def freeze_bn(self) -> None:
        """Use BN's running statistics from now on (also in train mode) and stop updating them."""
        self.bn_frozen = True

    def unfreeze_bn(self) -> None:
        """Back to batch statistics in train mode (the default)."""
        self.bn_frozen = False

    def _bn_scale(self) -> torch.Tensor:
        bn = self.bn
        sf = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        return torch.where(sf == 0, torch.full_like(sf, _TINY_SCALE), sf)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.pre_activation(x))

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """The output before the ReLU/ReLU6 (quant.frozen_view fuses a ReLU into the quantizer after it)."""
        conv, bn = self.conv, self.bn
        if bn is None:
            bias = conv.bias if conv.bias is not None else None
            return conv._conv_forward(x, self.weight_fake_quant(conv.weight),
                                      quantize_bias(bias, self._input_quant, self.weight_fake_quant))
        sf = self._bn_scale()
        w_q = self.weight_fake_quant(conv.weight * sf.reshape(-1, 1, 1, 1))
        if not self.training or self.bn_frozen:
            # Running statistics: run exactly the folded conv the export and an NPU run, conv(x, w_q) +
            # b_fold, rather than conv / sf then BN, whose float rounding moves values across
            # quantization boundaries. Gradients still reach gamma and beta through w_q and b_fold.
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            b_fold = quantize_bias((bias - bn.running_mean) * sf + bn.bias, self._input_quant, self.weight_fake_quant)
            return conv._conv_forward(x, w_q, b_fold)
        y = conv._conv_forward(x, w_q / sf.reshape(-1, 1, 1, 1), conv.bias)
        return bn(y)  # batch statistics; the running statistics keep updating

    @torch.no_grad()
    def folded_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Float (weight, bias) of the single conv the integer model runs (before weight quantization)."""
        conv = self.conv
        if self.bn is None:
            bias = conv.bias if conv.bias is not None else conv.weight.new_zeros(conv.out_channels)
            return conv.weight.detach().clone(), bias.detach().clone()
        weight, bias = _fold(conv, self.bn)
        return weight.detach(), bias.detach()

    def weight_error(self) -> torch.Tensor:
        """Quantized minus float weight of the conv the integer model runs (BN folded with its running
        statistics), without gradient: conv(x, weight_error()) is the output error weights cause."""
        with torch.no_grad():
            weight, _ = self.folded_weight_and_bias()
            return self.weight_fake_quant(weight) - weight

    def conv_only(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """This module's convolution geometry applied to ``x`` with another weight and no bias."""
        return self.conv._conv_forward(x, weight, None)

    @torch.no_grad()
    def shift_output(self, delta: torch.Tensor) -> bool:
        """Subtract ``delta`` (per output channel) from the pre-activation output in eval mode. With BN
        the shift goes into its running mean, which is where QAT's batch statistics would put it;
        without BN into the conv bias. False when there is nowhere to put it (no BN, no bias)."""
        bn = self.bn
        if bn is not None:
            sf = self._bn_scale()
            bn.running_mean.add_(torch.where(sf.abs() > _TINY_SCALE, delta / sf, torch.zeros_like(delta)))
            return True
        if self.conv.bias is None:
            return False
        self.conv.bias.sub_(delta)
        return True

    def extra_repr(self) -> str:
        return f"bn_mode={self.bn_mode}" + (", bn_frozen=True" if self.bn_frozen else "")


class QATConv(_LinksInput, nn.Conv2d):
    """An ``nn.Conv2d`` with a fake-quantized weight and (optionally) a fake-quantized output.

    Drop-in for a conv inside a module fx does not trace into (e.g. a detection head): it *is* a
    Conv2d sharing the original's ``weight``/``bias`` parameters, so the owner's forward and any
    code reading ``.weight``/``.bias`` keep working, and state_dict keys stay those of the conv
    (plus ``weight_fake_quant.*`` and ``out_quant.*``).
    """

    def __init__(self, conv: nn.Conv2d, weight_fq: nn.Module, out_fq: Optional[nn.Module] = None) -> None:
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                         device=conv.weight.device, dtype=conv.weight.dtype)
        self.weight = conv.weight
        self.bias = conv.bias
        self.weight_fake_quant = weight_fq
        self.out_quant = out_fq if out_fq is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = quantize_bias(self.bias, self._input_quant, self.weight_fake_quant)
        return self.out_quant(self._conv_forward(x, self.weight_fake_quant(self.weight), bias))

    def weight_error(self) -> torch.Tensor:
        """Quantized minus float weight, without gradient."""
        with torch.no_grad():
            return self.weight_fake_quant(self.weight) - self.weight

    def conv_only(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, weight, None)

    @torch.no_grad()
    def shift_output(self, delta: torch.Tensor) -> bool:
        """Subtract ``delta`` (per output channel) from the bias; False when the conv has none."""
        if self.bias is None:
            return False
        self.bias.sub_(delta)
        return True

    @torch.no_grad()
    def folded_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Float (weight, bias) for export; a zero bias when the conv has none."""
        bias = self.bias if self.bias is not None else self.weight.new_zeros(self.out_channels)
        return self.weight.detach().clone(), bias.detach().clone()
