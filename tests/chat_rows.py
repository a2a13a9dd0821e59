"""A small chat dataset file for the CLI tests: n rows of messages (user q{i}, assistant a{i} ok)."""
import json


def write_chat_rows(path, n: int = 8):
    """Write the rows to `path` (JSONL) and return it."""
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i} ok"}]}
            for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path
