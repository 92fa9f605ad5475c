"""Shared fixtures. Identities are checked in float64 (DESIGN §6); the suite runs on CPU."""

import itertools

import jax
import jax.random as jr
import pytest

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "standard")


@pytest.fixture
def getkey():
    """A fresh PRNG key on every call, deterministic per test."""
    counter = itertools.count()
    base = jr.key(0)
    return lambda: jr.fold_in(base, next(counter))
