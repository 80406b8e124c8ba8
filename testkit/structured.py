"""Field types beyond text that tests' signatures declare: a pydantic model, a model that nests
it, an Enum (module level, so DSPy resolves them under `from __future__ import annotations`)."""

from __future__ import annotations

import enum

from pydantic import BaseModel


class Line(BaseModel):
    item: str
    quantity: int


class Order(BaseModel):
    lines: list[Line]
    note: str | None = None


class Size(enum.Enum):
    SMALL = "small"
    LARGE = "large"
