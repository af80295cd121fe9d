"""SAM2 image path (tpo_jax.sam2) against upstream SAM 2 (`sam2` package 1.1.0, v1 settings), f32.

The upstream package is optional: tests that need it are skipped when `import sam2` fails. Install it without
its CUDA extension: `SAM2_BUILD_CUDA=0 pip install --no-deps sam2==1.1.0 hydra-core iopath omegaconf`.
"""

import numpy as np
import pytest

import jax.numpy as jnp

from tpo_jax.sam2.position import sine_position_encoding

torch = pytest.importorskip("torch")


def _upstream(module: str):
    try:
        return __import__(f"sam2.{module}", fromlist=["_"])
    except Exception as e:  # noqa: BLE001 - any failure to import the optional reference skips
        pytest.skip(f"upstream sam2 not importable: {e}")


def _numpy_sine(h, w, dim, temperature=10000.0):
    """Independent float64 evaluation with explicit loops (normalize=True, scale 2π)."""
    n = dim // 2
    out = np.zeros((h, w, dim))
    for i in range(h):
        for j in range(w):
            y = (i + 1) / (h + 1e-6) * 2 * np.pi
            x = (j + 1) / (w + 1e-6) * 2 * np.pi
            for k in range(n):
                om = temperature ** (2 * (k // 2) / n)
                f = np.sin if k % 2 == 0 else np.cos
                out[i, j, k] = f(y / om)
                out[i, j, n + k] = f(x / om)
    return out


# -------------------------------------------------------------------------------------------- position encoding

@pytest.mark.parametrize("h,w,dim", [(4, 6, 16), (8, 8, 64)])
def test_sine_position_encoding_matches_float64_loops(h, w, dim):
    ours = np.asarray(sine_position_encoding(h, w, dim))
    assert ours.shape == (h, w, dim) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, _numpy_sine(h, w, dim), atol=2e-6)


@pytest.mark.parametrize("h,w,dim", [(16, 16, 256), (7, 11, 64), (64, 64, 256)])
def test_sine_position_encoding_matches_upstream(h, w, dim):
    pe = _upstream("modeling.position_encoding")
    ref = pe.PositionEmbeddingSine(dim)(torch.zeros(2, dim, h, w))
    ref = ref[0].permute(1, 2, 0).numpy()
    ours = np.asarray(sine_position_encoding(h, w, dim))
    assert np.abs(ours - ref).max() <= 1e-6


def test_sine_position_encoding_dtype_and_errors():
    assert sine_position_encoding(4, 4, 8, dtype=jnp.bfloat16).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="even"):
        sine_position_encoding(4, 4, 7)
    with pytest.raises(ValueError, match="normalize"):
        sine_position_encoding(4, 4, 8, normalize=False, scale=1.0)
