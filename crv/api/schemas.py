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
#: a (layer, feature) pair, as a two-item JSON array
FeaturePair = Annotated[list[int], Field(min_length=2, max_length=2)]
Step = Annotated[str, Field(min_length=1), AfterValidator(_step)]


EXAMPLE_QUESTION = "4+((5+6)*(2+(9*5)))"
EXAMPLE_STEPS = ["5+6=11 => 4+(11*(2+(9*5)))", "9*5=45 => 4+(11*(2+45))", "2+45=47 => 4+(11*47)", "11*47=587 => 4+587"]


class VerifyRequest(BaseModel):
    """A problem and its chain of thought: ``steps`` (one per item) or ``text`` (one step per line)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"task": "arith", "question": EXAMPLE_QUESTION, "steps": EXAMPLE_STEPS}],
        "oneOf": [{"required": ["steps"]}, {"required": ["text"]}]})  # exactly one of the two, as the validator says
    task: Task
    question: Text = Field(min_length=1, pattern=r"\S")
    # not nullable: absent means "not given" (the schema's oneOf), so an explicit null is refused by type
    steps: list[Step] = Field(default=None, min_length=1, max_length=MAX_STEPS,  # type: ignore[assignment]
                              description="one step per item: non-empty, not blank, no newline")
    text: Text = Field(default=None, min_length=1, pattern=r"\S",  # type: ignore[assignment]
                       description="one step per line; the `A:` line is left out")
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
    description: str | None = None  # on a flagged step's first features, where descriptions exist (crv describe-features)


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

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"task": "arith", "question": EXAMPLE_QUESTION, "steps": EXAMPLE_STEPS, "step_index": 3,
                      "features": "auto", "mode": "clamp", "value": 0.0}]})
    task: Task
    question: Text = Field(min_length=1, pattern=r"\S")
    steps: list[Step] = Field(min_length=1, max_length=MAX_STEPS)
    step_index: int = Field(ge=0, lt=MAX_STEPS)
    features: list[FeaturePair] | Literal["auto"] = "auto"
    mode: Literal["clamp", "scale", "set"] = "clamp"
    value: float = Field(default=0.0, ge=-MAX_EDIT_VALUE, le=MAX_EDIT_VALUE, allow_inf_nan=False,
                         description="the activation for `set`, the factor for `scale` (finite, |value| <= 1e4)")
    k: int = Field(default=3, ge=1, le=64)


class InterveneResponse(BaseModel):
    step_index: int
    features: list[FeaturePair]
    descriptions: list[str | None] = []  # of the edited features, where descriptions exist (crv describe-features)
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
