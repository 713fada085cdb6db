"""The one prompt template used by every stage (StackLLaMA's "Question: ...\\n\\nAnswer: ...")."""

from __future__ import annotations


def format_prompt(question: str) -> str:
    """The prompt a policy completes: ``Question: {question}\\n\\nAnswer: ``."""
    return f"Question: {question}\n\nAnswer: "


def format_qa(question: str, answer: str) -> str:
    """A full training text: ``format_prompt(question) + answer``."""
    return f"Question: {question}\n\nAnswer: {answer}"
