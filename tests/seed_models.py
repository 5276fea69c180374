"""Small plain-PyTorch models that reproduce the patterns plain torch.fx int8 stumbles on.

Each ``make_<name>()`` returns a ``Fixture``: the model in eval mode with BatchNorm statistics
gathered from data (so folding BN is a real test, not a no-op on mean 0 / var 1), one example
input tuple, 16 calibration input tuples, and ``sample()`` for fresh inputs from the same
distribution (a standard normal, except for the lip-reading net's synthetic mouth clips). No
fxq import: these are the inputs fxq must handle, written the way users write them.
"""

import functools
import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

NUM_CALIBRATION_BATCHES = 16
BATCHNORM_WARMUP_PASSES = 5


class Fixture(NamedTuple):
    model: nn.Module
    example_inputs: tuple
    calibration: list
    sample: Callable[[], tuple]  # fresh inputs, drawn like the others


def recalibrate_batchnorm(model: nn.Module, batches) -> nn.Module:
    """Replace every BatchNorm's running statistics with the exact average over ``batches``.

    A cumulative average (momentum=None) rather than the default momentum of 0.1: after a few
    passes the latter still remembers the mean 0 / var 1 it was initialised with.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    with torch.no_grad():
        for inputs in batches:
            model(*inputs)
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    return model.eval()


def _build_fixture(model: nn.Module, sample_inputs: Callable[[], tuple]) -> Fixture:
    warmup = [sample_inputs() for _ in range(BATCHNORM_WARMUP_PASSES)]
    model = recalibrate_batchnorm(model, warmup)
    calibration = [sample_inputs() for _ in range(NUM_CALIBRATION_BATCHES)]
    return Fixture(model, sample_inputs(), calibration, sample_inputs)


def _normal_inputs(*shape: int) -> Callable[[], tuple]:
    return lambda: (torch.randn(*shape),)


def _randomize_prelu_slopes(model: nn.Module) -> None:
    # A fresh PReLU has every slope at 0.25; trained ones differ per channel, and a single
    # shared value would hide bugs that mix up the per-channel and single-slope forms.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.PReLU):
                module.weight.uniform_(0.05, 0.95)


# --- prelu_net -----------------------------------------------------------------------------


class ConvBNPReLU(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, prelu_slopes: int, stride: int = 1):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.PReLU(prelu_slopes),
        )


class PReLUNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = ConvBNPReLU(3, 16, prelu_slopes=1, stride=2)
        self.block_a = ConvBNPReLU(16, 16, prelu_slopes=16)
        self.block_b = ConvBNPReLU(16, 16, prelu_slopes=1)
        self.down = ConvBNPReLU(16, 32, prelu_slopes=32, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.block_b(self.block_a(x))
        x = self.pool(self.down(x))
        return self.fc(torch.flatten(x, 1))


def make_prelu_net() -> Fixture:
    torch.manual_seed(0)
    model = PReLUNet()
    _randomize_prelu_slopes(model)
    return _build_fixture(model, _normal_inputs(4, 3, 32, 32))


# --- inplace_net / inplace_conv_net --------------------------------------------------------


class InplaceNet(nn.Module):
    def forward(self, x):
        z = x + 0
        z += 1.0
        z.mul_(2)
        return z


def make_inplace_net() -> Fixture:
    torch.manual_seed(0)
    return _build_fixture(InplaceNet(), _normal_inputs(4, 3, 8, 8))


class InplaceConvNet(nn.Module):
    """A ResNet-style block written with every in-place spelling users reach for."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        identity = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(identity))
        out += identity
        out.relu_()
        y = torch.relu_(self.conv3(out))
        y = F.relu(y, inplace=True)
        y.mul_(0.5)
        y.add_(out)
        return self.fc(torch.flatten(self.pool(y), 1))


def make_inplace_conv_net() -> Fixture:
    torch.manual_seed(0)
    return _build_fixture(InplaceConvNet(), _normal_inputs(4, 3, 16, 16))


# --- lipreading_net (seed 002) -------------------------------------------------------------


def _fold_time_into_batch(x):
    # Written as in the lipreading repositories: unpacking x.shape is what makes it tricky.
    n_batch, n_channels, s_time, sx, sy = x.shape
    x = x.transpose(1, 2)
    return x.reshape(n_batch * s_time, n_channels, sx, sy)


def _resnet18_trunk(in_channels: int) -> nn.Module:
    trunk = torchvision.models.resnet18(weights=None)
    trunk.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
    trunk.fc = nn.Identity()
    return trunk


class LipreadingNet(nn.Module):
    """3D conv front end over a clip, a 2D ResNet-18 per frame, a BiGRU over time."""

    def __init__(self, frontend_channels: int = 16, hidden: int = 32, num_classes: int = 10):
        super().__init__()
        self.frontend = nn.Sequential(
            nn.Conv3d(1, frontend_channels, (5, 7, 7), (1, 2, 2), (2, 3, 3), bias=False),
            nn.BatchNorm3d(frontend_channels),
            nn.ReLU(),
            nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)),
        )
        self.trunk = _resnet18_trunk(frontend_channels)
        self.gru = nn.GRU(512, hidden, batch_first=True, bidirectional=True)
        self.classifier = nn.Linear(2 * hidden, num_classes)

    def forward(self, x):
        batch, time = x.shape[0], x.shape[2]
        frames = _fold_time_into_batch(self.frontend(x))
        features = self.trunk(frames).view(batch, time, -1)
        sequence, _ = self.gru(features)
        return self.classifier(sequence)


MOUTH_PATTERNS = 10  # classes: 5 opening frequencies x 2 phases
MOUTH_TRAINING_STEPS = 100


def mouth_clips(batch: int, frames: int = 8, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic lip-reading clips (B, 1, T, H, W) and their labels: a mouth-like blob at a random
    place and width, opening and closing with one of ``MOUTH_PATTERNS`` rhythms, plus noise."""
    labels = torch.randint(0, MOUTH_PATTERNS, (batch,))
    center = size / 2 + torch.randn(batch, 2) * size / 10
    width = size / 4 * (1 + 0.2 * torch.randn(batch))
    frequency, phase = (1 + labels % 5).float(), (labels // 5).float() * math.pi / 2
    time = torch.arange(frames).float()
    height = width[:, None] / 3 * (1.2 + torch.sin(2 * math.pi * frequency[:, None] * time / frames + phase[:, None]))
    grid = torch.arange(size).float()
    dx = ((grid[None, :] - center[:, :1]) / width[:, None])[:, None, None, :]  # (B, 1, 1, W)
    dy = (grid[None, None, :] - center[:, 1:, None]) / height[:, :, None]  # (B, T, H)
    clips = torch.exp(-(dx ** 2 + dy[..., None] ** 2)) + 0.1 * torch.randn(batch, frames, size, size)
    return ((clips - 0.15) / 0.3).unsqueeze(1), labels


def build_lipreading_net() -> Fixture:
    """Trained briefly on synthetic mouth clips, as seed 002's model was trained on real ones.

    Random-init, fed noise, this ResNet-18 trunk on 4x4..1x1 feature maps is chaotic: one int8
    conv alone (34 dB by itself) took the output to 13.8 dB, and no int8 scheme got past 13 dB.
    After 100 Adam steps it maps clips to features, not noise to noise (measured: 25.8 dB).
    """
    torch.manual_seed(2)
    model = LipreadingNet(num_classes=MOUTH_PATTERNS)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(MOUTH_TRAINING_STEPS):
        clips, labels = mouth_clips(4)
        loss = F.cross_entropy(model(clips)[:, -1], labels)  # the last step's logits
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    sample = lambda: (mouth_clips(2)[0],)  # noqa: E731
    return Fixture(model.eval(), sample(), [sample() for _ in range(NUM_CALIBRATION_BATCHES)], sample)


@functools.lru_cache(maxsize=1)
def make_lipreading_net() -> Fixture:
    """``build_lipreading_net``, trained once per process (fxq never modifies the model)."""
    return build_lipreading_net()


# --- relu6_net -----------------------------------------------------------------------------


def _conv_bn(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class ReLU6Net(nn.Module):
    """The four spellings of clamp(x, 0, 6), each after a Conv-BN."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.block1 = nn.Sequential(_conv_bn(3, 16, stride=2), nn.ReLU6())
        self.block2 = nn.Sequential(_conv_bn(16, 16), nn.Hardtanh(0.0, 6.0))
        self.conv_bn3 = _conv_bn(16, 32, stride=2)
        self.conv_bn4 = _conv_bn(32, 32)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.block2(self.block1(x))
        x = F.relu6(self.conv_bn3(x))
        x = F.hardtanh(self.conv_bn4(x), 0.0, 6.0)
        return self.fc(torch.flatten(self.pool(x), 1))


def make_relu6_net() -> Fixture:
    torch.manual_seed(0)
    return _build_fixture(ReLU6Net(), _normal_inputs(4, 3, 32, 32))


# --- standalone_bn_net ---------------------------------------------------------------------


class StandaloneBNNet(nn.Module):
    """BatchNorms with no conv in front to fold into: on the input, after a cat, after a flatten."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.input_bn = nn.BatchNorm2d(3)
        self.branch_a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.branch_b = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU())
        self.cat_bn = nn.BatchNorm2d(16)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.flatten = nn.Flatten()
        self.flat_bn = nn.BatchNorm1d(16 * 2 * 2)
        self.fc = nn.Linear(16 * 2 * 2, num_classes)

    def forward(self, x):
        x = self.input_bn(x)
        x = torch.cat([self.branch_a(x), self.branch_b(x)], dim=1)
        x = self.pool(self.cat_bn(x))
        return self.fc(self.flat_bn(self.flatten(x)))


def make_standalone_bn_net() -> Fixture:
    torch.manual_seed(0)
    return _build_fixture(StandaloneBNNet(), _normal_inputs(4, 3, 16, 16))


# --- control_flow_net ----------------------------------------------------------------------


class ControlFlowNet(nn.Module):
    """A flag argument that picks the output: fx turns ``embed`` into a Proxy and cannot branch."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn(3, 16, stride=2), nn.ReLU(), _conv_bn(16, 32, stride=2), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(32, num_classes)

    def forward(self, x, embed=False):
        if embed:
            return self.features(x)
        return self.head(self.features(x))


def make_control_flow_net() -> Fixture:
    torch.manual_seed(0)
    return _build_fixture(ControlFlowNet(), _normal_inputs(4, 3, 32, 32))


# --- zeros_like_maxpool3d_net --------------------------------------------------------------


class ZerosLikeMaxPool3dNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv3d(3, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU())
        self.pool = nn.MaxPool3d(2)
        self.conv2 = nn.Sequential(nn.Conv3d(8, 16, 3, padding=1), nn.BatchNorm3d(16), nn.ReLU())
        self.global_pool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        y = self.pool(self.conv1(x))
        accumulator = torch.zeros_like(y)
        y = accumulator + y
        y = self.conv2(y)
        return self.fc(torch.flatten(self.global_pool(y), 1))


def make_zeros_like_maxpool3d_net() -> Fixture:
    torch.manual_seed(0)
    return _build_fixture(ZerosLikeMaxPool3dNet(), _normal_inputs(2, 3, 4, 16, 16))


# --- same_pad_static_net / same_pad_dynamic_net --------------------------------------------


def _same_padding(size: int, kernel: int, stride: int, dilation: int) -> int:
    """Total padding TensorFlow's "SAME" adds along one axis (possibly odd, so asymmetric)."""
    return max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


def _split_same_padding(pad_h: int, pad_w: int) -> tuple:
    # TF puts the odd pixel at the bottom/right; F.pad takes (left, right, top, bottom).
    return (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)


class Conv2dStaticSame(nn.Conv2d):
    """Like efficientnet_pytorch's Conv2dStaticSamePadding: pads fixed at build time."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, groups=1,
                 bias=False, image_size=64):
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, 1, groups, bias)
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        self.pads = _split_same_padding(
            _same_padding(image_size, kh, sh, dh), _same_padding(image_size, kw, sw, dw))

    def forward(self, x):
        x = F.pad(x, self.pads)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class Conv2dDynamicSame(nn.Conv2d):
    """Like timm's conv2d_same / efficientnet_pytorch's Conv2dDynamicSamePadding.

    The padding depends on the input's size, read from ``x.shape`` in forward and rounded with
    math.ceil: exactly what symbolic tracing cannot follow.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, groups=1,
                 bias=False, image_size=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, 1, groups, bias)

    def forward(self, x):
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        pad_h = _same_padding(ih, kh, self.stride[0], self.dilation[0])
        pad_w = _same_padding(iw, kw, self.stride[1], self.dilation[1])
        if pad_h > 0 or pad_w > 0:
            x = F.pad(x, _split_same_padding(pad_h, pad_w))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


# (in, out, kernel, stride, groups): a stem, then depthwise + pointwise pairs mixing 3x3 and
# 5x5 kernels at strides 1 and 2, so both symmetric and asymmetric "same" pads occur.
SAME_PAD_LAYOUT = (
    (3, 16, 3, 2, 1),
    (16, 16, 3, 1, 16), (16, 24, 1, 1, 1),
    (24, 24, 3, 2, 24), (24, 32, 1, 1, 1),
    (32, 32, 5, 2, 32), (32, 48, 1, 1, 1),
    (48, 48, 5, 1, 48), (48, 64, 1, 1, 1),
)


def _same_pad_features(conv_class, image_size: int) -> nn.Sequential:
    layers, size = [], image_size
    for in_channels, out_channels, kernel, stride, groups in SAME_PAD_LAYOUT:
        # Static padding is fixed per layer, so each layer must know the size it will see.
        conv = conv_class(in_channels, out_channels, kernel, stride, groups, image_size=size)
        layers.append(nn.Sequential(conv, nn.BatchNorm2d(out_channels), nn.ReLU6()))
        size = math.ceil(size / stride)
    return nn.Sequential(*layers)


class SamePadDepthwiseNet(nn.Module):
    """MobileNet-like, with every conv padded TensorFlow-style by ``conv_class``."""

    def __init__(self, conv_class, image_size: int = 64, num_classes: int = 10):
        super().__init__()
        self.features = _same_pad_features(conv_class, image_size)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(SAME_PAD_LAYOUT[-1][1], num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def _first_sample_only(inputs: tuple) -> tuple:
    return (inputs[0][:1],)


def _make_same_pad_net(conv_class) -> Fixture:
    torch.manual_seed(0)
    model = SamePadDepthwiseNet(conv_class, image_size=64)
    # Batch 8 gives BatchNorm sensible statistics; the net is then exercised at batch 1, like a
    # deployed image model.
    fixture = _build_fixture(model, _normal_inputs(8, 3, 64, 64))
    return Fixture(fixture.model, _first_sample_only(fixture.example_inputs),
                   [_first_sample_only(inputs) for inputs in fixture.calibration],
                   lambda: _first_sample_only(fixture.sample()))


def make_same_pad_static_net() -> Fixture:
    return _make_same_pad_net(Conv2dStaticSame)


def make_same_pad_dynamic_net() -> Fixture:
    return _make_same_pad_net(Conv2dDynamicSame)


# --- hf_style_net / hf_style_toplevel_net --------------------------------------------------


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(_conv_bn(in_channels, out_channels, stride), nn.ReLU())


class FirstChannelGate(nn.Module):
    """Builds a mask from the input's shape and writes into it, as HuggingFace models do."""

    def forward(self, x):
        mask = x.new_zeros(x.shape[0], x.shape[1], 1, 1)
        mask[:, 0] = 1.0
        return x * (1.0 + mask)


class HFStyleNet(nn.Module):
    """Untraceable only inside ``gate``; everything around it is ordinary convs."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = _conv_bn_relu(3, 16, stride=2)
        self.gate = FirstChannelGate()
        self.body = _conv_bn_relu(16, 32, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.body(self.gate(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def make_hf_style_net() -> Fixture:
    torch.manual_seed(0)
    return _build_fixture(HFStyleNet(), _normal_inputs(4, 3, 32, 32))


class HFStyleTopLevelNet(nn.Module):
    """Untraceable at the top level (item assignment on an intermediate); children traceable."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.block1 = _conv_bn_relu(3, 16, stride=2)
        self.block2 = _conv_bn_relu(16, 32, stride=2)
        self.block3 = _conv_bn_relu(32, 32)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        y = self.block1(x)
        y[:, 0] = 0.0
        y = self.block3(self.block2(y))
        return self.fc(torch.flatten(self.pool(y), 1))


def make_hf_style_toplevel_net() -> Fixture:
    torch.manual_seed(0)
    return _build_fixture(HFStyleTopLevelNet(), _normal_inputs(4, 3, 32, 32))


SEED_MODELS = {
    "prelu_net": make_prelu_net,
    "inplace_net": make_inplace_net,
    "inplace_conv_net": make_inplace_conv_net,
    "lipreading_net": make_lipreading_net,
    "relu6_net": make_relu6_net,
    "standalone_bn_net": make_standalone_bn_net,
    "control_flow_net": make_control_flow_net,
    "zeros_like_maxpool3d_net": make_zeros_like_maxpool3d_net,
    "same_pad_static_net": make_same_pad_static_net,
    "same_pad_dynamic_net": make_same_pad_dynamic_net,
    "hf_style_net": make_hf_style_net,
    "hf_style_toplevel_net": make_hf_style_toplevel_net,
}
