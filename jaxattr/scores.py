"""The explained quantity: a class's logit or softmax probability, picked per image from logits."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

Output = Literal["logit", "probability"]
OUTPUTS: tuple[str, ...] = ("logit", "probability")


def select_scores(logits: Float[Array, "b k"], targets: Int[Array, " b"], output: Output = "logit") -> Float[Array, " b"]:
    """logits[i, targets[i]], or the softmax probability of that class."""
    if output == "probability":
        logits = jax.nn.softmax(logits, axis=-1)
    elif output != "logit":
        raise ValueError(f"unknown output {output!r}; expected one of {OUTPUTS}")
    return jnp.take_along_axis(logits, targets[:, None].astype(jnp.int32), axis=-1)[:, 0]
