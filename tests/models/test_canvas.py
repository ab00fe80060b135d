"""mmdet's canvas inside a larger static input: outputs equal the network on the canvas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from solov2_jax import models
from solov2_jax.models import canvas


@pytest.fixture(scope="module")
def model_and_variables():
    cfg = tiny.get_config()
    model = models.build_model(cfg.model)
    variables = models.init_variables(model, jax.random.PRNGKey(0))
    leaves, tdef = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    # Perturb everything (zero-init BN scales would hide whole branches).
    leaves = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return model, jax.tree.unflatten(tdef, leaves)


def test_outputs_equal_the_network_run_on_each_canvas(model_and_variables):
    """Two images with different canvases (96x160 gives odd P5 and P6 sizes) in one
    160x224 input: every output inside the canvas equals running the network on an
    input that *is* the canvas; maps are zero past it."""
    model, variables = model_and_variables
    rng = np.random.default_rng(0)
    image = np.zeros((2, 160, 224, 3), np.float32)
    image[0, :90, :150] = rng.normal(size=(90, 150, 3))
    image[1, :60, :100] = rng.normal(size=(60, 100, 3))
    canvases = np.array([[96, 160], [64, 128]], np.int32)
    apply = jax.jit(model.apply)
    out = apply(variables, jnp.asarray(image), jnp.asarray(canvases))
    for i, (ch, cw) in enumerate(canvases):
        ref = apply(variables, jnp.asarray(image[i:i + 1, :ch, :cw]))
        pairs = [*zip(out.backbone, ref.backbone, strict=True),
                 *zip(out.fpn, ref.fpn, strict=True), (out.mask_feats, ref.mask_feats),
                 *zip(out.kernel_preds, ref.kernel_preds, strict=True),
                 *zip(out.cls_preds, ref.cls_preds, strict=True)]
        for k, (a, b) in enumerate(pairs):
            a = np.asarray(a[i, :b.shape[1], :b.shape[2]])
            b = np.asarray(b[0])
            assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max(), k
        feats = np.asarray(out.mask_feats[i])
        assert not feats[ch // 4:].any() and not feats[:, cw // 4:].any()
    # The whole input as canvas is the plain network.
    plain = apply(variables, jnp.asarray(image))
    full = apply(variables, jnp.asarray(image), jnp.asarray([[160, 224]] * 2, jnp.int32))
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(plain), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(np.abs(b).max()))


def test_upsample_clamps_at_the_canvas_edge_like_torch():
    """x2 bilinear of a canvas region == torch-style upsample of the region alone."""
    from solov2_jax import ops

    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 9, 11, 3)).astype(np.float32)
    valid = jnp.asarray([[5, 7]], jnp.int32)
    got = canvas.upsample2x(jnp.asarray(x), valid)[0, :10, :14]
    want = ops.interpolate_bilinear(jnp.asarray(x[:, :5, :7]), (10, 14))[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_coordinates_are_torch_linspace():
    """Bit for bit, every length (torch rounds each half's multiply-add once)."""
    import torch

    lengths = jnp.arange(1, 61, dtype=jnp.int32)
    got = np.asarray(canvas.coordinates(jnp.stack([lengths, lengths], 1), (60, 60)))
    for n in range(1, 61):
        want = torch.linspace(-1, 1, n).numpy()
        np.testing.assert_array_equal(got[n - 1, 0, :n, 0], want, err_msg=f"n={n}")
        np.testing.assert_array_equal(got[n - 1, :n, 0, 1], want, err_msg=f"n={n}")
