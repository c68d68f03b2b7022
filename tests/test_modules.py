"""torch_cnnbp.Conv2d / MaxPool2d as drop-in modules, and swap_modules / unswap_modules on real networks.

Oracles: torch.nn.Conv2d / torch.nn.MaxPool2d built with the same arguments and seed (parameters,
repr, state dict, forward and backward through the shared harness), and a ResNet-18 and a VGG-style
network run before and after conversion.
"""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import torch_cnnbp

from helpers import assert_close, assert_close_within_native_error, compare_with_native, no_native_kernels_ran

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def seeded(cls, *args, **kwargs):
    """cls(*args, **kwargs) built right after seeding, so two classes draw the same initial values."""
    torch.manual_seed(1234)
    return cls(*args, **kwargs)


# ---- Conv2d -----------------------------------------------------------------------------------

# (id, in_channels, out_channels, kernel_size, keyword arguments, input H×W)
CONV_CASES = [
    ("plain", 3, 4, 3, {}, (7, 8)),
    ("all_options", 4, 6, (3, 2), dict(stride=(2, 1), padding=(1, 2), dilation=(2, 1), groups=2, bias=False), (9, 8)),
    ("same_odd", 3, 4, 3, dict(padding="same"), (6, 7)),
    ("same_even_dilated", 3, 4, (4, 3), dict(padding="same", dilation=2), (9, 8)),
    ("valid", 3, 2, 3, dict(padding="valid"), (6, 6)),
    ("depthwise", 4, 8, 3, dict(groups=4, padding=1, stride=2), (8, 7)),
    ("reflect", 3, 4, 3, dict(padding=1, padding_mode="reflect"), (6, 7)),
    ("replicate_pair", 3, 4, (3, 2), dict(padding=(2, 1), padding_mode="replicate", stride=2), (7, 6)),
    ("circular_same", 3, 4, (2, 3), dict(padding="same", padding_mode="circular"), (6, 5)),
    ("reflect_same_dilated_nobias", 2, 3, 3, dict(padding="same", padding_mode="reflect", dilation=2, bias=False),
     (7, 7)),
    ("factory_kwargs", 3, 4, 3, dict(padding=1, device="cpu", dtype=torch.float64), (5, 6)),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_conv2d_module_is_native_module(case):
    _, cin, cout, k, kwargs, _ = case
    ours, native = seeded(torch_cnnbp.Conv2d, cin, cout, k, **kwargs), seeded(nn.Conv2d, cin, cout, k, **kwargs)
    assert repr(ours) == repr(native)
    assert [(n, p.shape, p.dtype) for n, p in ours.named_parameters()] == \
           [(n, p.shape, p.dtype) for n, p in native.named_parameters()]
    # Same initialisation: the same seed gives the same values.
    for (name, a), b in zip(ours.state_dict().items(), native.state_dict().values()):
        assert torch.equal(a, b), name
    # State dicts interchangeable, both ways, strictly.
    other_native, other_ours = nn.Conv2d(cin, cout, k, **kwargs), torch_cnnbp.Conv2d(cin, cout, k, **kwargs)
    other_native.load_state_dict(ours.state_dict())
    other_ours.load_state_dict(native.state_dict())
    for a, b in zip(other_native.parameters(), other_ours.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("unbatched", [False, True], ids=["batched", "unbatched"])
@pytest.mark.parametrize("case", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_conv2d_module_forward_backward(case, unbatched, dtype):
    _, cin, cout, k, kwargs, hw = case
    kwargs = {key: v for key, v in kwargs.items() if key not in ("device", "dtype")}
    ours, native = torch_cnnbp.Conv2d(cin, cout, k, **kwargs), nn.Conv2d(cin, cout, k, **kwargs)
    names = [n for n, _ in native.named_parameters()]

    def run(module):
        return lambda x, *params: functional_call(module, dict(zip(names, params)), (x,))

    x = torch.randn(*((cin,) if unbatched else (2, cin)), *hw, dtype=torch.float64)
    params = [p.detach().to(torch.float64) for p in native.parameters()]
    compare_with_native(run(ours), run(native), [t.to(dtype) for t in (x, *params)], dtype, msg=case[0])


def test_conv2d_module_runs_only_our_kernels():
    m = torch_cnnbp.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    assert no_native_kernels_ran(lambda: m(x).sum().backward()) == []


# ---- MaxPool2d --------------------------------------------------------------------------------

# (id, positional arguments, keyword arguments, input shape)
POOL_CASES = [
    ("k2", (2,), {}, (2, 3, 8, 7)),
    ("k3_s2_p1", (3, 2, 1), {}, (2, 3, 9, 8)),
    ("everything", ((3, 2),), dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2), ceil_mode=True), (2, 2, 9, 9)),
    ("indices", (2,), dict(return_indices=True, ceil_mode=True), (2, 3, 7, 7)),
    ("stride_none_tuple_kernel", ((2, 3),), dict(stride=None), (1, 2, 6, 9)),
    ("unbatched", (3,), dict(stride=2, padding=1, return_indices=True), (3, 7, 8)),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", POOL_CASES, ids=[c[0] for c in POOL_CASES])
def test_max_pool2d_module(case, dtype):
    _, args, kwargs, shape = case
    ours, native = torch_cnnbp.MaxPool2d(*args, **kwargs), nn.MaxPool2d(*args, **kwargs)
    assert repr(ours) == repr(native)
    assert ours.state_dict().keys() == native.state_dict().keys()
    compare_with_native(ours, native, [torch.randn(shape, dtype=dtype)], dtype, msg=case[0])


# ---- serialisation ----------------------------------------------------------------------------


def small_net():
    return nn.Sequential(torch_cnnbp.Conv2d(3, 4, 3, padding=1, padding_mode="circular"), nn.ReLU(),
                         torch_cnnbp.MaxPool2d(2), torch_cnnbp.Conv2d(4, 2, 3))


def assert_same_module(a: nn.Module, b: nn.Module, x):
    assert [type(m) for m in a.modules()] == [type(m) for m in b.modules()]
    assert repr(a) == repr(b)
    for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(ta, tb)
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("how", ["pickle", "deepcopy", "torch.save", "state_dict"])
def test_serialisation_round_trip(how):
    net, x = small_net(), torch.randn(2, 3, 6, 6)
    if how == "pickle":
        back = pickle.loads(pickle.dumps(net))
    elif how == "deepcopy":
        back = copy.deepcopy(net)
    else:
        buffer = io.BytesIO()
        torch.save(net if how == "torch.save" else net.state_dict(), buffer)
        buffer.seek(0)
        if how == "torch.save":
            back = torch.load(buffer, weights_only=False)  # a whole module is not weights-only
        else:
            back = small_net()
            back.load_state_dict(torch.load(buffer, weights_only=True))
    assert back is not net
    assert_same_module(back, net, x)


def test_state_dict_loads_into_native_model_and_back():
    ours, x = small_net(), torch.randn(2, 3, 6, 6)
    native = torch_cnnbp.unswap_modules(small_net())
    assert not any(isinstance(m, (torch_cnnbp.Conv2d, torch_cnnbp.MaxPool2d)) for m in native.modules())
    native.load_state_dict(ours.state_dict())
    torch.testing.assert_close(native(x), ours(x), rtol=1e-5, atol=1e-5)
    again = small_net()
    again.load_state_dict(native.state_dict())
    assert torch.equal(again(x), ours(x))


# ---- the networks -----------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
    """torchvision's ResNet-18 layout: 7×7/2 stem, 3×3/2 max-pool, four stages of two BasicBlocks."""

    def __init__(self, num_classes=10, width=64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, planes = [], width
        for i, mult in enumerate((1, 2, 4, 8)):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(planes, width * mult, stride), BasicBlock(width * mult, width * mult)))
            planes = width * mult
        self.layers = nn.ModuleList(stages)
        self.fc = nn.Linear(planes, num_classes)

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        for stage in self.layers:
            x = stage(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class VGGStyle(nn.Module):
    """VGG-11's pattern at a small width: 3×3 convolutions with batch norm, 2×2 max-pools, dropout."""

    CFG = (16, "M", 32, "M", 64, 64, "M", 128, 128, "M")

    def __init__(self, num_classes=10):
        super().__init__()
        layers, channels = [], 3
        for v in self.CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                channels = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.ModuleDict({"fc1": nn.Linear(channels * 4, 64), "drop": nn.Dropout(0.5),
                                         "fc2": nn.Linear(64, num_classes)})

    def forward(self, x):
        x = torch.flatten(self.features(x), 1)
        c = self.classifier
        return c["fc2"](c["drop"](F.relu(c["fc1"](x))))


NETWORKS = {"resnet18": ResNet18, "vgg": VGGStyle}


def run_network(model, x, grad_output):
    """Output, parameter gradients and buffers after one forward (seeded, for dropout) and backward."""
    model.zero_grad()
    torch.manual_seed(7)
    out = model(x)
    out.backward(grad_output)
    return out.detach(), [p.grad for p in model.parameters()], [b.clone() for b in model.buffers()]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", NETWORKS)
def test_swapped_network_matches_native(name, dtype, train):
    torch.manual_seed(0)
    native = NETWORKS[name]().to(dtype).train(train)
    exact = copy.deepcopy(native).double()  # the float64 result that judges float32 rounding
    ours = torch_cnnbp.swap_modules(copy.deepcopy(native))
    assert ours.training == train
    assert not any(type(m) in (nn.Conv2d, nn.MaxPool2d) for m in ours.modules())
    assert sum(type(m) is torch_cnnbp.Conv2d for m in ours.modules()) == \
           sum(type(m) is nn.Conv2d for m in native.modules())

    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    grad_output = torch.randn(2, 10, dtype=torch.float64)
    got = run_network(ours, x.to(dtype), grad_output.to(dtype))
    want = run_network(native, x.to(dtype), grad_output.to(dtype))
    ref = run_network(exact, x, grad_output) if dtype == torch.float32 else want
    names = ["output"] + [f"grad {n}" for n, _ in native.named_parameters()] + \
            [f"buffer {n}" for n, _ in native.named_buffers()]
    for label, a, b, r in zip(names, [got[0], *got[1], *got[2]], [want[0], *want[1], *want[2]],
                              [ref[0], *ref[1], *ref[2]]):
        assert a.dtype == b.dtype, label
        if not b.is_floating_point():
            assert torch.equal(a, b), label  # num_batches_tracked
        elif dtype == torch.float64:
            assert_close(a, b, scale=max(1.0, b.abs().max().item()), msg=f"{name} {label}")
        else:
            assert_close_within_native_error(a, b, r, msg=f"{name} {label}")


def test_swapped_network_runs_only_our_kernels_and_swaps_back():
    torch.manual_seed(0)
    native = ResNet18(width=8)
    x = torch.randn(2, 3, 32, 32)
    expected = native.eval()(x)
    ours = torch_cnnbp.swap_modules(native)
    forbidden = ("convolution", "mkldnn", "max_pool", "im2col")
    assert no_native_kernels_ran(lambda: ours(x).sum().backward(), forbidden) == []
    torch.testing.assert_close(ours(x), expected, rtol=1e-4, atol=1e-5)
    back = torch_cnnbp.unswap_modules(ours)
    assert {type(m) for m in back.modules()} & {torch_cnnbp.Conv2d, torch_cnnbp.MaxPool2d} == set()
    assert sum(type(m) is nn.Conv2d for m in back.modules()) == 20
    assert torch.equal(back(x), expected)


# ---- swap_modules: what it carries, where it looks ------------------------------------------------


def test_swap_carries_state_and_optimizer_keeps_working():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16, 2))
    model.to(torch.float64).eval()
    model[0].weight.requires_grad_(False)
    params_before = list(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []
    handle = model[0].register_forward_hook(lambda *_: calls.append(1))

    assert torch_cnnbp.swap_modules(model) is model
    conv = model[0]
    assert type(conv) is torch_cnnbp.Conv2d and type(model[1]) is torch_cnnbp.MaxPool2d
    assert not conv.training and conv.weight.dtype == torch.float64 and not conv.weight.requires_grad
    assert all(a is b for a, b in zip(model.parameters(), params_before))  # the same tensors
    before = model[3].weight.detach().clone()
    model(torch.randn(2, 3, 4, 4, dtype=torch.float64)).sum().backward()
    optimizer.step()
    assert not torch.equal(model[3].weight, before)
    assert calls == [1]
    handle.remove()  # a handle from before the swap still works
    model(torch.randn(2, 3, 4, 4, dtype=torch.float64))
    assert calls == [1]


def test_swap_finds_modules_everywhere():
    shared = nn.Conv2d(2, 2, 1)
    model = nn.ModuleDict({
        "seq": nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sequential(nn.MaxPool2d(2), shared)),
        "list": nn.ModuleList([shared, nn.ModuleList([nn.MaxPool2d(3, ceil_mode=True)])]),
    })
    model.extra = nn.Conv2d(2, 2, 1)
    torch_cnnbp.swap_modules(model)
    assert model["seq"][1][1] is model["list"][0]  # a module used twice stays one module
    kinds = [type(m) for m in model.modules() if not isinstance(m, (nn.ModuleDict, nn.ModuleList, nn.Sequential))]
    assert kinds and all(k in (torch_cnnbp.Conv2d, torch_cnnbp.MaxPool2d) for k in kinds)

    root = nn.Conv2d(3, 4, 3)
    ours = torch_cnnbp.swap_modules(root)
    assert type(ours) is torch_cnnbp.Conv2d and ours.weight is root.weight
    assert type(torch_cnnbp.unswap_modules(ours)) is nn.Conv2d


def test_swap_leaves_subclasses_alone():
    class MyConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(MyConv(1, 1, 1), nn.Conv2d(1, 1, 1))
    torch_cnnbp.swap_modules(model)
    assert type(model[0]) is MyConv and type(model[1]) is torch_cnnbp.Conv2d
    assert torch_cnnbp.swap_modules(model)[1] is model[1]  # already ours: untouched
