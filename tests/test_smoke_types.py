import jax.numpy as jnp

import nfdm_de as nd


def test_python_float_time_is_accepted(getkey):
    fwd = nd.LinearInterpolant()
    x = jnp.ones(3)
    z = fwd.transform(jnp.zeros(3), 0.5, x)
    assert z.shape == (3,)
