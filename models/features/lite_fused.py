"""EfficientNet-Lite0/1/2 rebuilt for inference: batch norm folded, channels-last, fused ReLU6.

The efficientnet-lite package's network runs every convolution, then a separate batch norm, then a
separate ReLU6, pads every "SAME" convolution with an explicit ZeroPad2d copy, and sends its 1x1
convolutions (90% of the multiply-adds) through torch's slow unfold-and-GEMM path at small batches.
Here, from the same weights:
- each batch norm is folded into the convolution before it (eval mode, running statistics);
- symmetric pads are the convolutions' own padding; the asymmetric stride-2 pads (right = left + 1)
  become left + stride on both sides, which gives the same windows plus one output row and column
  in front, dropped (no copy of the input);
- activations stay channels-last (NHWC memory) from the stem to the pooled mean;
- generic ops (any device): a 1x1 convolution is one addmm over the (N*H*W, C) view, ReLU6 in place;
- on the CPU in float32, `pack_for_cpu` switches every convolution to oneDNN with its weights
  reordered once and ReLU6 or the residual add fused into the convolution.
tests/test_image_features.py checks both against the package's network.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from efficientnet_lite_pytorch import EfficientNet
from torch import nn

_MKLDNN = torch.ops.mkldnn  # the fused oneDNN convolutions that torch.compile's CPU backend uses


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of conv followed by bn in eval mode, as one convolution."""
    mean, var = cast(torch.Tensor, bn.running_mean), cast(torch.Tensor, bn.running_var)
    scale = bn.weight.detach() / torch.sqrt(var + bn.eps)
    weight = conv.weight.detach() * scale[:, None, None, None]
    bias = bn.bias.detach() - mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias.detach() * scale
    return weight, bias


def _same_pad(conv: nn.Module) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) of the package's static 'SAME' padding of this convolution."""
    pad = getattr(conv, "static_padding", None)
    if isinstance(pad, nn.ZeroPad2d):
        left, right, top, bottom = pad.padding
        return left, right, top, bottom
    return 0, 0, 0, 0


class _Conv(nn.Module):
    """One convolution with its batch norm folded in, optionally followed by ReLU6."""

    weight: torch.Tensor  # (C_out, C_in / groups, k, k)
    bias: torch.Tensor  # (C_out,)

    def __init__(self, conv: nn.Module, bn: nn.Module, *, relu: bool) -> None:
        super().__init__()
        assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
        weight, bias = _fold(conv, bn)
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.stride, self.groups, self.relu = int(conv.stride[0]), conv.groups, relu
        self.pointwise = conv.kernel_size == (1, 1) and conv.groups == 1 and self.stride == 1
        left, right, top, bottom = _same_pad(conv)
        if (left, right) != (top, bottom) or not left <= right <= left + self.stride:
            raise ValueError(f"expected SAME padding, equal on both axes, got {_same_pad(conv)}")
        self.cut = int(left != right)  # 1: drop the first output row and column
        self.padding = left + self.stride * self.cut
        self.packed: torch.Tensor | None = None  # the oneDNN weight, after pack()

    def pack(self, input_shape: tuple[int, ...]) -> None:
        """Reorder the weight once into oneDNN's layout for inputs of this shape (CPU, float32)."""
        self.packed = torch._C._nn.mkldnn_reorder_conv2d_weight(  # type: ignore[call-arg]  # stub lacks input_size
            self.weight.to_mkldnn(),
            [self.padding] * 2,
            [self.stride] * 2,
            [1, 1],
            self.groups,
            list(input_shape),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor
        if self.packed is not None:
            act, scalars = ("hardtanh", [0.0, 6.0]) if self.relu else ("none", [])
            y = _MKLDNN._convolution_pointwise(  # (Any: torch.ops has no stubs)
                x, self.packed, self.bias, [self.padding] * 2, [self.stride] * 2, [1, 1],
                self.groups, act, scalars, "",
            )  # fmt: skip
        elif self.pointwise:
            n, c, h, w = x.shape
            rows = x.permute(0, 2, 3, 1).reshape(n * h * w, c)  # a view when x is channels-last
            y = torch.addmm(self.bias, rows, self.weight[:, :, 0, 0].t())
            y = y.view(n, h, w, -1).permute(0, 3, 1, 2)  # channels-last (N, C_out, H, W)
            return y.clamp_(0.0, 6.0) if self.relu else y
        else:
            y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, 1, self.groups)
        if self.cut:
            y = y[:, :, 1:, 1:]
        return y.clamp_(0.0, 6.0) if self.relu and self.packed is None else y

    def plus(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """This convolution of x (no ReLU) + residual; oneDNN writes the sum into residual."""
        assert not self.relu and not self.cut
        if self.packed is None:
            y: torch.Tensor = self(x)
            return y.add_(residual)
        return _MKLDNN._convolution_pointwise_.binary(  # type: ignore[no-any-return]  # no stubs
            residual, x, self.packed, self.bias, [self.padding] * 2, [self.stride] * 2, [1, 1],
            self.groups, "add", 1.0, None, [], "",
        )  # fmt: skip


class _Block(nn.Module):
    """An MBConv block: optional 1x1 expansion, depthwise, 1x1 projection, identity skip."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        args = getattr(block, "_block_args")  # noqa: B009  # the package's BlockArgs tuple
        part = block.get_submodule
        expand = args.expand_ratio != 1
        self.expand = _Conv(part("_expand_conv"), part("_bn0"), relu=True) if expand else None
        self.depthwise = _Conv(part("_depthwise_conv"), part("_bn1"), relu=True)
        self.project = _Conv(part("_project_conv"), part("_bn2"), relu=False)
        stride = args.stride[0] if isinstance(args.stride, list) else args.stride
        self.skip = bool(args.id_skip and stride == 1 and args.input_filters == args.output_filters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.depthwise(self.expand(x) if self.expand is not None else x)
        # x is the previous layer's output, which nothing else holds: oneDNN may add into it.
        return self.project.plus(y, x) if self.skip else self.project(y)


class FusedLite(nn.Module):
    """EfficientNet-Lite up to its global average pool, (N, 3, S, S) -> (N, 1280), S its input side
    (224 for Lite0, 240 for Lite1, 260 for Lite2)."""

    def __init__(self, net: EfficientNet) -> None:
        super().__init__()
        gp = net._global_params
        if gp.relu_fn != "relu6" or gp.use_se:
            raise ValueError("expected an EfficientNet-Lite network (ReLU6, no squeeze-excite)")
        self.size = int(gp.image_size)  # the input side the static 'SAME' pads were made for
        self.stem = _Conv(net._conv_stem, net._bn0, relu=True)
        self.blocks = nn.Sequential(*(_Block(b) for b in net._blocks))
        self.head = _Conv(net._conv_head, net._bn1, relu=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.size, self.size):
            raise ValueError(f"expected {self.size}x{self.size} inputs, got {tuple(x.shape)}")
        y: torch.Tensor = self.head(
            self.blocks(self.stem(x.contiguous(memory_format=torch.channels_last)))
        )
        return y.mean(dim=(2, 3))


def fuse_lite(net: EfficientNet) -> FusedLite:
    """The fused inference network of an EfficientNet-Lite (its weights copied, in eval mode)."""
    return FusedLite(net.eval()).eval()


def pack_for_cpu(net: FusedLite) -> FusedLite:
    """Switch a float32 CPU FusedLite to oneDNN convolutions with reordered weights (in place).

    Pack in a thread with the torch thread count the network will run with: oneDNN lays the
    weights out for it (load_backbone packs on one of its workers). Move it no more after this.
    """
    if net.stem.weight.device.type != "cpu" or net.stem.weight.dtype != torch.float32:
        raise ValueError("expected a float32 network on the CPU to pack for oneDNN")
    if not torch._C._has_mkldnn:
        return net
    convs = [m for m in net.modules() if isinstance(m, _Conv)]  # in the order they run
    shapes: list[tuple[int, ...]] = []
    hooks = [
        c.register_forward_pre_hook(lambda _, a: shapes.append(tuple(a[0].shape))) for c in convs
    ]
    with torch.inference_mode():
        net(torch.zeros(1, 3, net.size, net.size))
    for hook in hooks:
        hook.remove()
    # Packed for one image: measured as fast as packing per batch size at batches of 8 and 32,
    # and 15-20% faster for one image than oneDNN's layout chosen without a shape.
    for conv, shape in zip(convs, shapes, strict=True):
        conv.pack(shape)
    return net
