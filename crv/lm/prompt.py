"""Prompt formats: how a question and the steps so far become the text a model reads.

Two formats, chosen per model (``crv_model.json``'s ``prompt_format``, else ``chat``
when the tokenizer has a chat template and ``plain`` otherwise) and recorded with every run:

* ``plain`` (the shipped reasoner)::

      <BOS>Q: (3+4)*2\\n3+4=7 => 7*2\\n7*2=14 => 14\\n

* ``chat``: the model's own chat template; for crv's synthetic tasks one worked example as a
  user / assistant exchange, then user turn = the task's instruction + the question, the
  generation prompt, and the assistant's steps so far, one per line, the turn left open (this
  is the text of the paper's ``formatted_assistant_content_after``)::

      <|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n{instruction}\\n\\nQ: (3+4)*(2-5)<|im_end|>\\n
      <|im_start|>assistant\\n3+4=7 => 7*(2-5)\\n...A: -21<|im_end|>\\n
      <|im_start|>user\\n{instruction}\\n\\nQ: (3+4)*2<|im_end|>\\n
      <|im_start|>assistant\\n3+4=7 => 7*2\\n7*2=14 => 14\\n

A rendered trace knows the character span of every step (the step's own text, its
newline excluded); :mod:`crv.lm.encode` turns those into token spans.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from transformers import PreTrainedTokenizerBase

QUESTION_PREFIX = "Q: "
ANSWER_PREFIX = "A: "

_EXAMPLE = {
    "arith": ("(3+4)*(2-5)", ["3+4=7 => 7*(2-5)", "2-5=-3 => 7*(-3)", "7*(-3)=-21 => -21"], "-21"),
    "bool": ("not (True and False) or False",
             ["True and False=False => not False or False", "not False=True => True or False",
              "True or False=True => True"], "True"),
}

#: the user-turn instruction of each task (chat format); ``{example}`` is a worked example in crv's step format
INSTRUCTIONS: dict[str, str] = {
    "arith": "Evaluate the integer expression step by step. Each line reduces exactly one operation on two numbers "
             "and rewrites the whole expression, as `operation=result => new expression`. End with `A: <value>`.",
    "bool": "Evaluate the boolean expression step by step. Each line reduces exactly one operation and rewrites the "
            "whole expression, as `operation=result => new expression`. End with `A: <value>`.",
}
GENERIC_INSTRUCTION = "Solve the problem step by step, one step per line. End with `A: <answer>`."


def instruction(task: str) -> str:
    """The user-turn instruction for ``task``."""
    return INSTRUCTIONS.get(task, GENERIC_INSTRUCTION)


def chat_messages(task: str, question: str, system: str | None = None, example: bool = True,
                  instruct: bool = True) -> list[dict[str, str]]:
    """The chat turns before the assistant's steps: for crv's synthetic tasks a worked example first
    (one user / assistant exchange in crv's step format; ``example=False`` leaves it out), then
    user = instruction + question (``instruct=False``: the question alone, for a model fine-tuned on the format)."""
    messages = [] if system is None else [{"role": "system", "content": system}]
    if example and task in _EXAMPLE:
        q, steps, a = _EXAMPLE[task]
        messages += [{"role": "user", "content": f"{instruction(task)}\n\n{QUESTION_PREFIX}{q}"},
                     {"role": "assistant", "content": "".join(s + "\n" for s in steps) + ANSWER_PREFIX + a}]
    user = f"{instruction(task)}\n\n{QUESTION_PREFIX}{question}" if instruct else f"{QUESTION_PREFIX}{question}"
    messages.append({"role": "user", "content": user})
    return messages


@dataclass(frozen=True)
class RenderedTrace:
    """A trace's text and, per step, the character span ``[start, end)`` of the step (no newline)."""

    text: str
    step_chars: tuple[tuple[int, int], ...]
    add_bos: bool  # the tokenizer's BOS goes first (the text holds no special tokens of its own)


class PromptFormat(Protocol):
    """Renders a question and steps into model text (see the module docstring)."""

    name: str

    def prompt(self, task: str, question: str) -> str: ...

    @property
    def add_bos(self) -> bool: ...


def render(fmt: PromptFormat, task: str, question: str, steps: Sequence[str]) -> RenderedTrace:
    """The prompt, then each step followed by a newline, with the steps' character spans."""
    text = fmt.prompt(task, question)
    spans = []
    for step in steps:
        spans.append((len(text), len(text) + len(step)))
        text += step + "\n"
    return RenderedTrace(text, tuple(spans), fmt.add_bos)


@dataclass(frozen=True)
class PlainFormat:
    """crv's own format: ``Q: <question>\\n`` and one step per line (BOS first)."""

    name: str = "plain"

    def prompt(self, task: str, question: str) -> str:
        return f"{QUESTION_PREFIX}{question}\n"

    @property
    def add_bos(self) -> bool:
        return True


@dataclass(frozen=True)
class ChatFormat:
    """The model's chat template: user = instruction + question, assistant = the steps so far (turn open)."""

    tokenizer: PreTrainedTokenizerBase
    system: str | None = None  # None: the template's default system turn, if it has one
    example: bool = True  # a worked example as the first exchange (crv's synthetic tasks)
    instruct: bool = True  # the task's instruction before the question in the user turn
    name: str = "chat"

    def __post_init__(self) -> None:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template; use the 'plain' prompt format")

    def prompt(self, task: str, question: str) -> str:
        return self.tokenizer.apply_chat_template(
            chat_messages(task, question, self.system, self.example, self.instruct), tokenize=False,
            add_generation_prompt=True, date_string=TEMPLATE_DATE)

    @property
    def add_bos(self) -> bool:
        return False  # the template writes its own specials (BOS included where the model has one)


PROMPT_FORMATS = ("plain", "chat")

#: the date a chat template that calls ``strftime_now`` / reads ``date_string`` writes (pinned: the same
#: trace must give the same text, and so the same graph, on any day)
TEMPLATE_DATE = "26 Jul 2024"

#: the chat options of a model fine-tuned on crv's format (``crv finetune``): a one-line system turn,
#: no worked example, the question alone in the user turn
SHORT_CHAT = {"system": "Reason step by step.", "example": False, "instruct": False}


def make_format(name: str, tokenizer: PreTrainedTokenizerBase, chat: dict | None = None) -> PromptFormat:
    """A prompt format by name (``plain`` or ``chat``); ``chat``: :class:`ChatFormat` options
    (``system``, ``example``, ``instruct``), as a model's ``crv_model.json`` stores them."""
    if name == "plain":
        return PlainFormat()
    if name == "chat":
        opts = dict(chat or {})
        unknown = set(opts) - {"system", "example", "instruct"}
        if unknown:
            raise ValueError(f"unknown chat option(s) {sorted(unknown)}; known: system, example, instruct")
        return ChatFormat(tokenizer, **opts)
    raise ValueError(f"unknown prompt format {name!r}; choose from {', '.join(PROMPT_FORMATS)}")


def default_format_name(tokenizer: PreTrainedTokenizerBase, notes: dict | None = None) -> str:
    """A model's prompt format: its ``crv_model.json`` says, else chat when it has a chat template."""
    if notes and notes.get("prompt_format"):
        return str(notes["prompt_format"])
    return "chat" if getattr(tokenizer, "chat_template", None) else "plain"
