"""The Flax FID Inception against pytorch-fid's ``InceptionV3`` (random weights, converted).

pytorch-fid 0.3.0 (``tests/metrics/pytorch_fid_ref.py`` loads it without torchvision) is built
with random weights of O(1) activations; its ``state_dict`` goes through
:func:`jaxdiff.metrics.inception.convert_state_dict` and the same images through both networks.
pool3 features (and fc logits) agree to 1e-4 of their largest magnitude.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.metrics import inception as I
from tests.metrics import pytorch_fid_ref

INC, _, WHY = pytorch_fid_ref.load()
needs_ref = pytest.mark.skipif(INC is None, reason=WHY or "")
TOL = 1e-4


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    import torch

    net, full = pytorch_fid_ref.random_fid_inception(INC, seed=0)
    d = tmp_path_factory.mktemp("inc")
    pth = str(d / "pt_inception-random.pth")  # the file layout of pytorch-fid's weights
    torch.save(full.state_dict(), pth)
    path = I.convert_pth(pth, str(d / "inception_fid.npz"))  # torch.load(weights_only=True)
    with np.load(path, allow_pickle=False) as z:
        assert z["params/Mixed_5b/branch1x1/conv/kernel"].shape == (1, 1, 192, 64)
    return net, full, I.load_variables(path)


def _torch_features(net, full, images_01, resize):
    import torch

    net.resize_input = resize
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(images_01.transpose(0, 3, 1, 2)))
        pool3 = net(x)[0][:, :, 0, 0]
        logits = full.fc(pool3)
    return pool3.numpy(), logits.numpy()


def _rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


@needs_ref
def test_pool3_and_logits_match_pytorch_fid_at_75px(nets):
    """The whole network, without the resize (75x75 is its smallest input): one small compile."""
    net, full, variables = nets
    x01 = np.random.default_rng(0).uniform(0, 1, (2, 75, 75, 3)).astype(np.float32)
    ref_pool3, ref_logits = _torch_features(net, full, x01, resize=False)
    assert ref_pool3.std() > 0.1 and np.abs(ref_logits).max() > 0.1  # the weights keep activations O(1)
    out = jax.jit(I.InceptionV3(resize_input=False).apply)(variables, jnp.asarray(2 * x01 - 1))
    assert out["pool3"].shape == (2, 2048) and out["logits"].shape == (2, 1008)
    assert _rel_err(out["pool3"], ref_pool3) < TOL
    assert _rel_err(out["logits"], ref_logits) < TOL
    # the Inception Score's logits: pool3 @ W, no bias (Salimans et al. 2016's code)
    bias = full.fc.bias.detach().numpy()
    assert np.abs(bias).max() > 1e-3  # a zero bias could not tell the two apart
    assert _rel_err(out["logits_unbiased"], ref_logits - bias) < TOL


@needs_ref
def test_evaluation_scores_inception_score_on_unbiased_logits(nets, monkeypatch):
    """``jaxdiff.eval``'s Inception extractor feeds ``pool3 @ W`` (no fc bias) to the IS."""
    import functools

    from jaxdiff import eval as E

    net, full, variables = nets
    monkeypatch.setattr(I, "load_variables", lambda path=None: variables)
    # 75x75 without the resize to 299: one small compile (the resize is tested above)
    monkeypatch.setattr(I, "InceptionV3", functools.partial(I.InceptionV3, resize_input=False))
    ext = dataclasses.replace(E.get_extractor("inception"), quantize=False)
    x01 = np.random.default_rng(3).uniform(0, 1, (2, 75, 75, 3)).astype(np.float32)
    pool3, logits = _torch_features(net, full, x01, resize=False)
    got = ext(jnp.asarray(2 * x01 - 1))
    assert _rel_err(got["features"], pool3) < TOL
    assert _rel_err(got["logits"], logits - full.fc.bias.detach().numpy()) < TOL


@needs_ref
@pytest.mark.parametrize("size", [(32, 32), (8, 8), (400, 330)])
def test_resize_is_torch_bilinear_without_align_corners(size):
    import torch
    import torch.nn.functional as F

    x = np.random.default_rng(1).standard_normal((2, *size, 3)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2)), size=(299, 299), mode="bilinear",
                        align_corners=False).numpy().transpose(0, 2, 3, 1)
    assert _rel_err(I.resize_bilinear(jnp.asarray(x), (299, 299)), ref) < 1e-5


@needs_ref
@pytest.mark.slow
def test_pool3_matches_pytorch_fid_with_resize_to_299(nets):
    net, full, variables = nets
    x01 = np.random.default_rng(2).uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
    ref_pool3, ref_logits = _torch_features(net, full, x01, resize=True)
    out = jax.jit(I.InceptionV3().apply)(variables, jnp.asarray(2 * x01 - 1))
    assert _rel_err(out["pool3"], ref_pool3) < TOL
    assert _rel_err(out["logits"], ref_logits) < TOL


@needs_ref
def test_converter_rejects_foreign_state_dicts(nets):
    _, full, _ = nets
    sd = dict(full.state_dict())
    sd["AuxLogits.fc.weight"] = sd["fc.weight"]
    with pytest.raises(ValueError, match="unexpected key"):
        I.convert_state_dict(sd)
    flat = I.convert_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith("Mixed_7c")})
    with pytest.raises(ValueError, match="missing"):
        I.save_variables(flat, "/nonexistent/x.npz")


def test_missing_weights_error_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.delenv(I.ENV_VAR, raising=False)
    with pytest.raises(FileNotFoundError, match="JAXDIFF_INCEPTION_WEIGHTS") as e:
        I.load_variables(None)
    assert "python -m jaxdiff.metrics.inception" in str(e.value) and "--inception_weights" in str(e.value)
    monkeypatch.setenv(I.ENV_VAR, str(tmp_path / "nope.npz"))
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        I.load_variables(None)
    pth = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    pth.write_bytes(b"")
    with pytest.raises(ValueError, match="PyTorch file"):
        I.load_variables(str(pth))
