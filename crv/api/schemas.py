"""Request and response bodies of the step-verification service (pydantic; the OpenAPI spec at /docs)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

Task = Literal["arith", "bool"]

#: the limits the handlers enforce, stated in the schema (the service may be started with other counts; the
#: byte, character and token limits are in GET /v1/model)
MAX_STEPS = 32
#: the largest |value| an intervention may set or scale by (beyond it float32 activations overflow)
MAX_EDIT_VALUE = 1e4


def _valid_unicode(text: str) -> str:
    """Refuse lone surrogates (JSON's ``\\ud800``): they are not text and cannot be tokenized."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains a lone surrogate (\\ud800-\\udfff): not valid Unicode text") from None
    return text


def _step(text: str) -> str:
    if not text.strip():
        raise ValueError("a step is empty or only whitespace")
    if "\n" in text:
        raise ValueError("a step contains a newline (send one step per list item)")
    return _valid_unicode(text)


Text = Annotated[str, AfterValidator(_valid_unicode)]
Step = Annotated[str, Field(min_length=1), AfterValidator(_step)]


class VerifyRequest(BaseModel):
    """A problem and its chain of thought: ``steps`` (one per item) or ``text`` (one step per line)."""

    model_config = ConfigDict(extra="forbid")
    task: Task
    question: Text = Field(min_length=1, pattern=r"\S")
    steps: list[Step] | None = Field(default=None, min_length=1, max_length=MAX_STEPS,
                                     description="one step per item: non-empty, not blank, no newline")
    text: Text | None = Field(default=None, min_length=1, description="one step per line; the `A:` line is left out")
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
    question: Text = Field(min_length=1, pattern=r"\S")
    steps: list[Step] = Field(min_length=1, max_length=MAX_STEPS)
    step_index: int = Field(ge=0, lt=MAX_STEPS)
    features: list[tuple[int, int]] | Literal["auto"] = "auto"
    mode: Literal["clamp", "scale", "set"] = "clamp"
    value: float = Field(default=0.0, ge=-MAX_EDIT_VALUE, le=MAX_EDIT_VALUE, allow_inf_nan=False,
                         description="the activation for `set`, the factor for `scale` (finite, |value| <= 1e4)")
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
