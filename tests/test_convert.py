"""convrnn_kernels.nn.convert: a converted model gives torch's outputs and gradients (train and
eval mode) for the classic networks as torchvision builds them, a captioning model and a model
holding every layer convert() swaps; it keeps the Parameter objects, buffers, state_dict keys,
optimizer, training flags, hooks and attributes; it leaves what it cannot serve with one
warning; convert(inverse=True) gives torch's layers back.

Whole networks are compared twice: in float32 their outputs, and in float64 their outputs and
every parameter's gradient.  float32 gradients of a ReLU network make no fair comparison: an
activation within rounding of a ReLU kink or a max-pool tie flips a mask, and two correct
float32 implementations then differ by percents (torchvision's ResNet18, seed 5, 64x64: torch's
own float32 model with its layer1.0.conv1 output perturbed by 1e-6 changes a gradient by 6%).
In float64 a flip needs an activation within 1e-15 of a kink.  The small models, with few
activations, are compared in float32 too."""
import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from helpers import import_ck
from models import Captioner, Zoo

ck = import_ck("nn")
from convrnn_kernels.nn.convert import OURS_TO_TORCH, TORCH_TO_OURS  # noqa: E402

# max |ours - torch| / max |torch| of whole-network values
RTOL = {torch.float32: 2e-4, torch.float64: 1e-8}


def _flat(out):
    return [out] if isinstance(out, torch.Tensor) else [t for o in out for t in _flat(o)]


def _run(model, inputs, backward=True, seed=1):
    """The model's outputs and (backward=True) every parameter's gradient of a random projection
    of them.  Dropout draws the same masks in every run (our kernels draw no random numbers)."""
    torch.manual_seed(seed)
    with torch.set_grad_enabled(backward):
        outs = _flat(model(*inputs))
    if not backward:
        return outs, {}
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype)).sum() for o in outs)
    model.zero_grad(set_to_none=True)
    loss.backward()
    return outs, {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def _assert_rel(ours, theirs, rtol, what):
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, what
    err, scale = (ours - theirs).abs().max().item(), theirs.abs().max().item()
    assert err <= rtol * scale, f"{what}: max |ours - torch| = {err:.3g} > {rtol:g} x max |torch| = {scale:.3g}"


def _convert_all(model):
    """convert(), which must serve every layer here: no warning, and no torch layer left."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ck.nn.convert(model)
    assert out is model
    left = [name for name, m in model.named_modules() if type(m) in TORCH_TO_OURS]
    assert not left, f"not converted: {left}"
    assert any(type(m) in OURS_TO_TORCH for m in model.modules())
    return model


def _compare(base, inputs, dtypes, backward_dtypes, what):
    """Copies of `base` in each dtype, torch's and converted, in train then eval mode."""
    for dtype in dtypes:
        theirs = copy.deepcopy(base).to(dtype)
        ours = _convert_all(copy.deepcopy(theirs))
        args = [t.to(dtype) if t.is_floating_point() else t for t in inputs]
        for train in (True, False):
            theirs.train(train)
            ours.train(train)
            backward = dtype in backward_dtypes
            (outs_t, grads_t), (outs_o, grads_o) = _run(theirs, args, backward), _run(ours, args, backward)
            tag = f"{what} {dtype} {'train' if train else 'eval'}"
            assert len(outs_o) == len(outs_t)
            for i, (o, t) in enumerate(zip(outs_o, outs_t)):
                _assert_rel(o, t, RTOL[dtype], f"{tag} output {i}")
            assert grads_o.keys() == grads_t.keys()
            for name in grads_t:
                _assert_rel(grads_o[name], grads_t[name], RTOL[dtype], f"{tag} grad {name}")


# ---- torchvision's networks -------------------------------------------------------------------

def _torchvision(name):
    tv = pytest.importorskip("torchvision")
    if name in ("alexnet", "vgg11"):
        # The classifier's 4096-wide Linear layers (58M of AlexNet's 61M parameters, 120M of
        # VGG11's 133M), which convert() leaves alone, are narrowed: building them costs
        # seconds and half a gigabyte.  The rest is torchvision's, built on the meta device
        # and initialised as torchvision initialises VGG.
        with torch.device("meta"):
            model = getattr(tv.models, name)(weights=None)
        width = next(m for m in model.classifier if isinstance(m, nn.Linear)).in_features
        model.classifier = nn.Sequential(nn.Dropout(), nn.Linear(width, 64), nn.ReLU(inplace=True), nn.Dropout(),
                                         nn.Linear(64, 10))
        model.to_empty(device="cpu")
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                m.reset_parameters()
        return model
    if name == "googlenet":  # train mode adds the two auxiliary classifiers' outputs
        return tv.models.googlenet(weights=None, init_weights=True)
    return getattr(tv.models, name)(weights=None)


# name, image size: the smallest power of two each accepts (AlexNet's stride-4 stem needs 63),
# 64 where train-mode batch norm would otherwise normalise over 2 values per channel
TORCHVISION = [("alexnet", 64), ("vgg11", 32), ("resnet18", 64), ("googlenet", 64), ("densenet121", 64)]


@pytest.mark.parametrize("name,size", TORCHVISION, ids=[n for n, _ in TORCHVISION])
def test_torchvision_nets(name, size):
    base = _torchvision(name)
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    _compare(base, [x], [torch.float32, torch.float64], [torch.float64], name)


# ---- small models -------------------------------------------------------------------------------

def test_captioning_model():
    base = Captioner()
    _compare(base, Captioner.inputs(), [torch.float32, torch.float64], [torch.float32, torch.float64], "captioner")
    ours = _convert_all(copy.deepcopy(base)).eval()
    images, _ = Captioner.inputs()
    words_t, logits_t = base.eval().greedy(images, 6)
    words_o, logits_o = ours.greedy(images, 6)
    _assert_rel(logits_o, logits_t, RTOL[torch.float32], "greedy decoding logits")
    assert torch.equal(words_o, words_t)


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
def test_every_layer():
    _compare(Zoo(), Zoo.inputs(), [torch.float32, torch.float64], [torch.float32, torch.float64], "zoo")
    converted = {type(m) for m in _convert_all(Zoo()).modules()}
    assert set(OURS_TO_TORCH) <= converted


# ---- what convert() keeps ----------------------------------------------------------------------

def test_keeps_parameters_buffers_and_state_dict():
    model = nn.Sequential(Zoo(), nn.BatchNorm1d(5))
    params, buffers = list(model.parameters()), list(model.buffers())
    state = model.state_dict()
    assert _convert_all(model) is model
    assert all(a is b for a, b in zip(model.parameters(), params)) and len(list(model.parameters())) == len(params)
    assert all(a is b for a, b in zip(model.buffers(), buffers)) and len(list(model.buffers())) == len(buffers)
    after = model.state_dict()
    assert list(after) == list(state)
    assert all(after[k].data_ptr() == state[k].data_ptr() for k in state)
    model.load_state_dict(state)
    for m in model.modules():  # the RNN modules' flat weight lists hold the same Parameters
        if isinstance(m, nn.RNNBase):
            assert all(w is getattr(m, n) for w, n in zip(m._flat_weights, m._flat_weights_names))


def test_optimizer_made_before_convert_still_trains():
    theirs = Zoo()
    ours = copy.deepcopy(theirs)
    initial = [p.detach().clone() for p in ours.parameters()]
    opt_t = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9)
    opt_o = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9)
    ck.nn.convert(ours)
    (x,) = Zoo.inputs()
    for model, opt in ((theirs, opt_t), (ours, opt_o)):
        for _ in range(2):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert all(not torch.equal(p, q) for p, q in zip(ours.parameters(), initial))


def test_keeps_identity_mode_hooks_attributes_and_sharing():
    shared = nn.Conv2d(4, 4, 3, padding=1)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), shared, nn.ReLU(), shared, nn.MaxPool2d(2))
    model[4].eval()
    theirs = copy.deepcopy(model)
    for m in (model, theirs):
        prune.l1_unstructured(m[1], "weight", amount=0.5)  # weight_orig, a mask buffer and a pre-hook
    conv = model[0]
    conv.note = "kept"
    calls = []
    conv.register_forward_pre_hook(lambda m, args: calls.append("pre"))
    handle = conv.register_forward_hook(lambda m, args, out: calls.append("post"))
    (x,) = Zoo.inputs()
    ck.nn.convert(model)
    assert model[0] is conv and model[1] is model[3] is shared
    assert type(conv) is ck.nn.Conv2d and type(shared) is ck.nn.Conv2d and type(model[4]) is ck.nn.MaxPool2d
    assert conv.note == "kept" and model.training and not model[4].training
    torch.testing.assert_close(model(x), theirs(x), rtol=1e-5, atol=1e-6)
    assert calls == ["pre", "post"]
    handle.remove()  # a handle taken before convert removes the hook from the converted module
    model(x)
    assert calls == ["pre", "post", "pre"]


def test_root_module_and_meta_device():
    lstm = nn.LSTM(3, 4, num_layers=2)
    assert ck.nn.convert(lstm) is lstm and type(lstm) is ck.nn.LSTM
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AvgPool2d(2))
        y = _convert_all(model)(torch.empty(2, 3, 10, 10))
    assert y.shape == (2, 4, 4, 4) and y.device.type == "meta"


def test_drop_ins_add_no_state():
    """convert() assigns __class__: sound only while the drop-ins set nothing up in __init__
    and keep torch's attributes (a drop-in that needs its own state must get a convert hook)."""
    for theirs, ours in TORCH_TO_OURS.items():
        assert ours.__bases__ == (theirs,)
        assert "__init__" not in vars(ours) and "__slots__" not in vars(ours), ours


# ---- what convert() leaves, and the way back ---------------------------------------------------

class MyConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


@pytest.mark.filterwarnings("ignore:Complex modules are a new feature")
def test_warns_once_naming_what_it_leaves():
    model = nn.Sequential(nn.Conv2d(2, 2, 1), MyConv(2, 2, 1), nn.LazyConv2d(2, 1))
    model.add_module("complex", nn.Conv2d(2, 2, 1).to(torch.complex64))
    model.add_module("lstm", nn.LSTM(2, 3))
    with pytest.warns(UserWarning) as record:
        ck.nn.convert(model)
    ours = [r for r in record if "convrnn_kernels.nn.convert" in str(r.message)]
    assert len(ours) == 1
    message = str(ours[0].message)
    for named in ("'1' (test_convert.MyConv: a subclass of torch.nn.Conv2d", "'2' (torch.nn.LazyConv2d: a lazy",
                  "'complex' (torch.nn.Conv2d: weight is torch.complex64"):
        assert named in message, message
    assert "'0'" not in message and "'lstm'" not in message
    assert [type(m) for m in model] == [ck.nn.Conv2d, MyConv, nn.LazyConv2d, nn.Conv2d, ck.nn.LSTM]


def test_inverse_round_trip():
    theirs = nn.Sequential(Zoo(), Captioner().encoder)
    model = copy.deepcopy(theirs)
    types = [type(m) for m in model.modules()]
    ck.nn.convert(model)
    assert ck.nn.convert(model, inverse=True) is model
    assert [type(m) for m in model.modules()] == types
    (x,) = Zoo.inputs()
    assert torch.equal(model[0](x), theirs[0](x))  # torch's own layers again: the same bits
    for m in model.modules():
        if isinstance(m, nn.RNNBase):
            assert all(w is getattr(m, n) for w, n in zip(m._flat_weights, m._flat_weights_names))

    class MyLSTM(ck.nn.LSTM):
        pass

    mixed = nn.Sequential(MyLSTM(2, 3), ck.nn.GRU(2, 3))
    with pytest.warns(UserWarning, match=r"'0' \(test_convert\..*MyLSTM: a subclass of convrnn_kernels\.nn\.LSTM"):
        ck.nn.convert(mixed, inverse=True)
    assert type(mixed[0]) is MyLSTM and type(mixed[1]) is nn.GRU
