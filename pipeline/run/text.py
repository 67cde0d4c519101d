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


class CompletionText:
    """One completion's text as its tokens arrive: the pieces that are safe to show (whole characters, never
    what could be the start of a stop string) and whether a stop string has appeared."""

    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.decoder = StreamDecoder(tokenizer)
        self.stop = [s for s in stop or [] if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.text = self.shown = ""
        self.stopped = False

    def push(self, token: int) -> str:
        piece = self.decoder.push(token)
        if not piece:
            return ""
        self.text += piece
        if not self.stop:  # nothing to cut or hold back
            self.shown = self.text
            return piece
        cut = cut_at_stop(self.text, self.stop)
        self.stopped = len(cut) < len(self.text)
        return self._show(cut if self.stopped or not self.hold else cut[:len(cut) - self.hold])

    def finish(self) -> str:
        """What is left to show: held-back characters, and a character cut off at the end."""
        return self._show(cut_at_stop(self.decoder.tokenizer.decode(self.decoder.ids), self.stop))

    def _show(self, ready: str) -> str:
        if len(ready) <= len(self.shown) or not ready.startswith(self.shown):
            return ""
        new, self.shown = ready[len(self.shown):], ready
        return new


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
