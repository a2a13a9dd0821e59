"""Small helpers for the words of messages that fasttune prints."""


def plural(count: int, noun: str, many: str | None = None) -> str:
    """`count` with its noun in the right number: plural(1, "step") == "1 step", plural(3, "step") == "3 steps"
    (`many` for irregular plurals)."""
    return f"{count} {noun if count == 1 else many or noun + 's'}"
