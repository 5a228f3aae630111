"""Request and response bodies of the step-verification service (pydantic; the OpenAPI spec at /docs)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Task = Literal["arith", "bool"]


class VerifyRequest(BaseModel):
    """A problem and its chain of thought: ``steps`` (one per item) or ``text`` (one step per line)."""

    model_config = ConfigDict(extra="forbid")
    task: Task
    question: str = Field(min_length=1)
    steps: list[str] | None = None
    text: str | None = None
    include_graph: bool = False

    @model_validator(mode="after")
    def _one_of(self) -> "VerifyRequest":
        if (self.steps is None) == (self.text is None):
            raise ValueError("give exactly one of 'steps' (a list) or 'text' (one step per line)")
        return self


class TopFeature(BaseModel):
    layer: int
    position: int
    feature: int
    influence: float


class StepResult(BaseModel):
    index: int
    text: str
    p_faulty: float
    flagged: bool
    threshold: float
    top_features: list[TopFeature]
    fingerprint: dict[str, float]
    graph: dict | None = None


class VerifyResponse(BaseModel):
    steps: list[StepResult]
    model: str
    classifier: str
    elapsed_ms: float


class InterveneRequest(BaseModel):
    """A trace, the step to correct, and the features to edit (``"auto"``: chosen from the step's graph)."""

    model_config = ConfigDict(extra="forbid")
    task: Task
    question: str = Field(min_length=1)
    steps: list[str] = Field(min_length=1)
    step_index: int = Field(ge=0)
    features: list[tuple[int, int]] | Literal["auto"] = "auto"
    mode: Literal["clamp", "scale", "set"] = "clamp"
    value: float = 0.0
    k: int = Field(default=3, ge=1, le=64)


class InterveneResponse(BaseModel):
    step_index: int
    features: list[tuple[int, int]]
    mode: str
    value: float
    position: int | str
    before: str
    after: str | None
    continuation: str
    steps: list[str]
    labels: list[int]
    step_correct: bool
    solved: bool
    final_answer: str | None


class Problem(BaseModel):
    """An error as JSON: ``detail`` says what was wrong."""

    detail: str
