"""Text around the generation loop: prompts in, streamed pieces out, stop strings cut."""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers.decoders import DecodeStream

from pipeline.errors import UserError


class StreamDecoder:
    """The text of a growing list of token ids, a piece at a time, whole characters only.

    tokenizers' DecodeStream keeps a short window of ids, so a step costs the same at token 10 and
    at token 1,000 (decoding everything produced so far costs 69 us a step at 1,024), and pieces add
    up to what decoding the whole list gives, for byte-level and Metaspace decoders alike (tested)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids = tokenizer, []
        self._stream = DecodeStream(skip_special_tokens=True)

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._stream.step(self.tokenizer, token) or ""


def cut_at_stop(text: str, stop: list[str] | None) -> str:
    """text up to the first stop string."""
    cut = min((i for i in (text.find(s) for s in stop or [] if s) if i >= 0), default=len(text))
    return text[:cut]


def read_prompts(path: Path) -> list[str]:
    """--prompts: one prompt per line, or JSONL ({"prompt": "..."} or a JSON string per line)."""
    try:
        lines = Path(path).read_text().splitlines()
    except (FileNotFoundError, IsADirectoryError):
        raise UserError(f"--prompts {path}: file does not exist") from None
    except UnicodeDecodeError:
        raise UserError(f"--prompts {path}: not UTF-8 text") from None
    jsonl = Path(path).suffix == ".jsonl"
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not jsonl:
            prompts.append(line)  # multi-line prompts: use .jsonl
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"--prompts {path}: line {n} is not JSON ({e.msg})") from None
        text = row.get("prompt") if isinstance(row, dict) else row
        if not isinstance(text, str):
            raise UserError(f"--prompts {path}: line {n} has no \"prompt\" string")
        prompts.append(text)
    if not prompts:
        raise UserError(f"--prompts {path}: no prompts (expected one per line)")
    return prompts
