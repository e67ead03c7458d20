"""pytorch-fid 0.3.0 as the reference, loaded without torchvision.

``pytorch_fid/inception.py`` builds its FID Inception from torchvision's ``Inception3`` (it
subclasses ``InceptionA/C/E`` and reuses ``BasicConv2d``, ``InceptionB/D`` and the stem), and
``pytorch_fid/fid_score.py`` imports ``torchvision.transforms``. torchvision is not installed
beside this torch (PyPI's torchvision breaks beside the pinned torch), so the tests load both
files from the installed package with a stub ``torchvision`` whose ``models.inception`` is a
transcription of torchvision 0.20's ``torchvision/models/inception.py`` (the classes
pytorch-fid uses: ``BasicConv2d``, ``InceptionA`` .. ``InceptionE``, ``Inception3`` with
``num_classes``/``aux_logits``/``init_weights`` and the same submodule names). If a real
torchvision is importable it is used instead.

Install: ``pip install --no-deps pytorch-fid==0.3.0`` (its own requirements pull torchvision).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

INSTALL = "pip install --no-deps pytorch-fid==0.3.0"


def _torchvision_stub():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class BasicConv2d(nn.Module):
        def __init__(self, in_channels, out_channels, **kwargs):
            super().__init__()
            self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
            self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

        def forward(self, x):
            return F.relu(self.bn(self.conv(x)), inplace=True)

    class InceptionA(nn.Module):
        def __init__(self, in_channels, pool_features, conv_block=None):
            super().__init__()
            c = conv_block or BasicConv2d
            self.branch1x1 = c(in_channels, 64, kernel_size=1)
            self.branch5x5_1 = c(in_channels, 48, kernel_size=1)
            self.branch5x5_2 = c(48, 64, kernel_size=5, padding=2)
            self.branch3x3dbl_1 = c(in_channels, 64, kernel_size=1)
            self.branch3x3dbl_2 = c(64, 96, kernel_size=3, padding=1)
            self.branch3x3dbl_3 = c(96, 96, kernel_size=3, padding=1)
            self.branch_pool = c(in_channels, pool_features, kernel_size=1)

    class InceptionB(nn.Module):
        def __init__(self, in_channels, conv_block=None):
            super().__init__()
            c = conv_block or BasicConv2d
            self.branch3x3 = c(in_channels, 384, kernel_size=3, stride=2)
            self.branch3x3dbl_1 = c(in_channels, 64, kernel_size=1)
            self.branch3x3dbl_2 = c(64, 96, kernel_size=3, padding=1)
            self.branch3x3dbl_3 = c(96, 96, kernel_size=3, stride=2)

        def forward(self, x):
            b3 = self.branch3x3(x)
            bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return torch.cat([b3, bd, F.max_pool2d(x, kernel_size=3, stride=2)], 1)

    class InceptionC(nn.Module):
        def __init__(self, in_channels, channels_7x7, conv_block=None):
            super().__init__()
            c = conv_block or BasicConv2d
            c7 = channels_7x7
            self.branch1x1 = c(in_channels, 192, kernel_size=1)
            self.branch7x7_1 = c(in_channels, c7, kernel_size=1)
            self.branch7x7_2 = c(c7, c7, kernel_size=(1, 7), padding=(0, 3))
            self.branch7x7_3 = c(c7, 192, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7dbl_1 = c(in_channels, c7, kernel_size=1)
            self.branch7x7dbl_2 = c(c7, c7, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7dbl_3 = c(c7, c7, kernel_size=(1, 7), padding=(0, 3))
            self.branch7x7dbl_4 = c(c7, c7, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7dbl_5 = c(c7, 192, kernel_size=(1, 7), padding=(0, 3))
            self.branch_pool = c(in_channels, 192, kernel_size=1)

    class InceptionD(nn.Module):
        def __init__(self, in_channels, conv_block=None):
            super().__init__()
            c = conv_block or BasicConv2d
            self.branch3x3_1 = c(in_channels, 192, kernel_size=1)
            self.branch3x3_2 = c(192, 320, kernel_size=3, stride=2)
            self.branch7x7x3_1 = c(in_channels, 192, kernel_size=1)
            self.branch7x7x3_2 = c(192, 192, kernel_size=(1, 7), padding=(0, 3))
            self.branch7x7x3_3 = c(192, 192, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7x3_4 = c(192, 192, kernel_size=3, stride=2)

        def forward(self, x):
            b3 = self.branch3x3_2(self.branch3x3_1(x))
            b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
            return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)

    class InceptionE(nn.Module):
        def __init__(self, in_channels, conv_block=None):
            super().__init__()
            c = conv_block or BasicConv2d
            self.branch1x1 = c(in_channels, 320, kernel_size=1)
            self.branch3x3_1 = c(in_channels, 384, kernel_size=1)
            self.branch3x3_2a = c(384, 384, kernel_size=(1, 3), padding=(0, 1))
            self.branch3x3_2b = c(384, 384, kernel_size=(3, 1), padding=(1, 0))
            self.branch3x3dbl_1 = c(in_channels, 448, kernel_size=1)
            self.branch3x3dbl_2 = c(448, 384, kernel_size=3, padding=1)
            self.branch3x3dbl_3a = c(384, 384, kernel_size=(1, 3), padding=(0, 1))
            self.branch3x3dbl_3b = c(384, 384, kernel_size=(3, 1), padding=(1, 0))
            self.branch_pool = c(in_channels, 192, kernel_size=1)

    class Inception3(nn.Module):
        def __init__(self, num_classes=1000, aux_logits=True, transform_input=False, inception_blocks=None,
                     init_weights=None, dropout=0.5):
            super().__init__()
            assert not aux_logits, "the stub has no auxiliary head (pytorch-fid does not use it)"
            self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
            self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
            self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
            self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
            self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
            self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
            self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
            self.Mixed_5b = InceptionA(192, pool_features=32)
            self.Mixed_5c = InceptionA(256, pool_features=64)
            self.Mixed_5d = InceptionA(288, pool_features=64)
            self.Mixed_6a = InceptionB(288)
            self.Mixed_6b = InceptionC(768, channels_7x7=128)
            self.Mixed_6c = InceptionC(768, channels_7x7=160)
            self.Mixed_6d = InceptionC(768, channels_7x7=160)
            self.Mixed_6e = InceptionC(768, channels_7x7=192)
            self.AuxLogits = None
            self.Mixed_7a = InceptionD(768)
            self.Mixed_7b = InceptionE(1280)
            self.Mixed_7c = InceptionE(2048)
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.dropout = nn.Dropout(p=dropout)
            self.fc = nn.Linear(2048, num_classes)

    tv = types.ModuleType("torchvision")
    tv.__version__ = "0.20.0"
    models = types.ModuleType("torchvision.models")
    inception = types.ModuleType("torchvision.models.inception")
    for cls in (BasicConv2d, InceptionA, InceptionB, InceptionC, InceptionD, InceptionE, Inception3):
        setattr(inception, cls.__name__, cls)
    models.inception = inception
    models.inception_v3 = lambda **kw: Inception3(**{k: v for k, v in kw.items() if k != "weights"})
    transforms = types.ModuleType("torchvision.transforms")
    tv.models, tv.transforms = models, transforms
    return {"torchvision": tv, "torchvision.models": models, "torchvision.models.inception": inception,
            "torchvision.transforms": transforms}


def load():
    """``(inception_module, fid_score_module, None)`` or ``(None, None, reason)``."""
    try:
        spec = importlib.util.find_spec("pytorch_fid")
        import torch  # noqa: F401
    except ImportError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None, None, f"pytorch-fid (and torch) not installed ({INSTALL})"
    root = Path(list(spec.submodule_search_locations)[0])
    name = "_jaxdiff_test_pytorch_fid"
    stubs = _torchvision_stub() if importlib.util.find_spec("torchvision") is None else {}
    saved = {m: sys.modules.get(m) for m in stubs}
    sys.modules.update(stubs)
    pkg = types.ModuleType(name)
    pkg.__path__ = [str(root)]
    sys.modules[name] = pkg
    mods = {}
    try:
        for sub in ("inception", "fid_score"):
            src = (root / f"{sub}.py").read_text().replace("from pytorch_fid.", f"from {name}.")
            mod = types.ModuleType(f"{name}.{sub}")
            mod.__file__ = str(root / f"{sub}.py")
            sys.modules[mod.__name__] = mod
            exec(compile(src, mod.__file__, "exec"), mod.__dict__)
            setattr(pkg, sub, mod)
            mods[sub] = mod
    except Exception as e:  # noqa: BLE001 -- any failure means: no reference here
        return None, None, f"pytorch-fid could not be loaded: {e!r}"
    finally:
        for m, old in saved.items():
            if old is None:
                sys.modules.pop(m, None)
            else:
                sys.modules[m] = old
    return mods["inception"], mods["fid_score"], None


def random_fid_inception(inception_mod, seed: int = 0):
    """pytorch-fid's ``InceptionV3()`` (pool3 block, resize, normalize) with random weights.

    ``fid_inception_v3`` downloads the weights through ``load_state_dict_from_url``; that name is
    replaced by one returning the freshly built network's own random ``state_dict``. Weights are
    then redrawn so activations stay O(1) through all 94 layers: conv kernels He-normal,
    BatchNorm scale / shift / running statistics random.
    """
    import torch

    orig_url, orig_load = inception_mod.load_state_dict_from_url, torch.nn.Module.load_state_dict
    orig_build = inception_mod.fid_inception_v3
    built = []
    inception_mod.load_state_dict_from_url = lambda *a, **k: None
    torch.nn.Module.load_state_dict = lambda self, sd, *a, **k: None if sd is None else orig_load(self, sd, *a, **k)
    inception_mod.fid_inception_v3 = lambda: built.append(orig_build()) or built[-1]
    try:
        net = inception_mod.InceptionV3([3])  # resize_input=True, normalize_input=True
    finally:
        inception_mod.load_state_dict_from_url = orig_url
        torch.nn.Module.load_state_dict = orig_load
        inception_mod.fid_inception_v3 = orig_build
    full = built[0]  # the whole FID Inception (with fc); net shares its blocks
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in full.state_dict().items():
            if name.endswith("conv.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * (2.0 / p[0].numel()) ** 0.5)
            elif name.endswith("bn.weight") or name.endswith("running_var"):
                p.copy_(0.6 + 0.8 * torch.rand(p.shape, generator=g))
            elif name.endswith("bn.bias") or name.endswith("running_mean"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif name.startswith("fc."):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    net.eval()
    full.eval()
    return net, full
