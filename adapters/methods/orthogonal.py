"""Orthogonal (peft): A and B from disjoint rows of one random orthogonal matrix, so B·A = 0 with B ≠ 0."""

from __future__ import annotations

from typing import Literal

from adapterflow.adapters.methods.basic import peft_builtin
from adapterflow.adapters.registry import InitConfig, Initializer, register


class OrthogonalInit(InitConfig):
    """Random A and B whose product is zero; needs an even adapter.r."""

    method: Literal["orthogonal"]

    def rank_problem(self, r: int) -> str | None:
        return None if r % 2 == 0 else f"init method orthogonal splits r rows between A and B: use an even adapter.r, not {r}"


# Not on a 4-bit base: peft casts A and B to the base weight's dtype, which is packed uint8 there.
register(
    Initializer(
        name="orthogonal", family="random", config=OrthogonalInit, apply=peft_builtin("orthogonal", "orthogonal"),
        mutates_base=False, needs_data=False, needs_grad=False, supports_quantized=False, preserves_outputs=True,
    )
)
