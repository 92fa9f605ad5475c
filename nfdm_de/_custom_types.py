"""One home for the type vocabulary used across nfdm-de.

Library functions work on *one example*: `Data` is a single data point of any shape
(a vector `(D,)` or an image `(H, W, C)`), and `Time` a scalar in `[0, 1]` with t = 0 the data
end and t = 1 the noise end. Batches are handled by `jax.vmap` at the call sites.
"""

from collections.abc import Callable

from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, Shaped

Data = Float[Array, "*shape"]
Time = Float[ArrayLike, ""]
Scalar = Float[Array, ""]
Key = PRNGKeyArray
# The conditioning input of one example: an integer class label (a scalar) or a vector.
Context = Shaped[Array, "*context"]
# A network or predictor: any callable (usually an `eqx.Module`) on one example, such as
# NN(x, t) or x_hat(z, t); its arguments depend on the role it plays.
Network = Callable[..., Array]
