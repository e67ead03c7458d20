"""``config.optim.weight_decay_mask``: which parameters AdamW's weight decay touches, against
``torch.optim.AdamW`` with the same split into parameter groups."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxdiff.train.state import make_optimizer

torch = pytest.importorskip("torch")


def optim(mask, **kw):
    return ml_collections.ConfigDict(dict(lr=1e-2, warmup_steps=0, schedule="constant", decay_steps=0,
                                          final_lr_fraction=0.0, weight_decay=0.1, b1=0.9, b2=0.999,
                                          eps=1e-8, grad_clip=0.0, weight_decay_mask=mask, **kw))


@pytest.mark.parametrize("mask", ["all", "matrices"])
def test_adamw_mask_matches_torch_param_groups(mask):
    rng = np.random.default_rng(0)
    params = {"dense": {"kernel": rng.normal(size=(4, 3)), "bias": rng.normal(size=(3,))},
              "norm": {"scale": 1 + rng.normal(size=(3,))}, "conv": {"kernel": rng.normal(size=(3, 3, 2, 4))}}
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    grads = [jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32), params) for _ in range(3)]

    tx = make_optimizer(optim(mask), num_steps=10)
    p, state = params, tx.init(params)
    for g in grads:
        updates, state = tx.update(g, state, p)
        p = optax.apply_updates(p, updates)

    flat, treedef = jax.tree_util.tree_flatten(params)
    tp = [torch.nn.Parameter(torch.from_numpy(np.asarray(a).copy())) for a in flat]
    decayed = [t for t, a in zip(tp, flat) if mask == "all" or a.ndim >= 2]
    plain = [t for t, a in zip(tp, flat) if not (mask == "all" or a.ndim >= 2)]
    groups = [{"params": decayed, "weight_decay": 0.1}] + ([{"params": plain, "weight_decay": 0.0}] if plain else [])
    opt = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    for g in grads:
        for t, a in zip(tp, jax.tree.leaves(g)):
            t.grad = torch.from_numpy(np.asarray(a).copy())
        opt.step()
    want = jax.tree_util.tree_unflatten(treedef, [t.detach().numpy() for t in tp])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-6, atol=1e-6), p, want)
    # the split is real: biases / norm scales move differently with and without the mask
    if mask == "matrices":
        assert len(plain) == 2 and len(decayed) == 2


def test_unknown_mask_is_refused():
    with pytest.raises(ValueError, match="weight_decay_mask='bias'"):
        make_optimizer(optim("bias"), num_steps=10)
