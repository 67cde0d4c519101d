"""Time to first token of a chat, turn 1 against turn 10, with the KV cache kept across turns and without.

    python benchmarks/chat_ttft.py EXPORT [--turns 10]

Runs the same conversation twice through pipeline.run.chat.ChatSession: once keeping the fused graph's
buffer across turns (each turn prefills only what the cache does not hold), once prefilling the whole
history every turn. An export without a chat template gets a compact one in a temporary copy. Prints a
table and writes it as a section of benchmarks/SERVE.md.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline import manifest  # noqa: E402
from pipeline.exports import chat_template, write_chat_template  # noqa: E402
from pipeline.run.chat import ChatSession  # noqa: E402
from pipeline.run.lm import OnnxLM  # noqa: E402

COMPACT = ("{% for m in messages %}{{ m['role'][0] }}:\n{{ m['content'] }}\n{% endfor %}"
           "{% if add_generation_prompt %}a:\n{% endif %}")
QUESTIONS = ["import os", "def f(x):", "return x", "class A:", "try:", "except:", "for i in x:", "while 1:",
             "with open(p):", "yield v", "del d[k]", "pass"]


def conversation(lm, reuse: bool, turns: int, max_new_tokens: int, repeats: int) -> list:
    """Per turn: (median ttft ms over repeats, tokens prefilled, tokens in the prompt)."""
    runs = []
    for _ in range(repeats):
        session = ChatSession(lm, max_new_tokens=max_new_tokens, reuse=reuse)
        for q in QUESTIONS[:turns]:
            for _ in session.reply(q):
                pass
        runs.append(session.turns)
    return [(statistics.median(r[t].ttft_s for r in runs) * 1000, runs[0][t].prefilled, runs[0][t].prompt_tokens)
            for t in range(turns)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("export", type=Path)
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--max-new-tokens", type=int, default=6)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "SERVE.md")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.export
        if chat_template(folder) is None:
            folder = Path(tmp) / args.export.resolve().name
            shutil.copytree(args.export, folder)
            manifest.record(folder, "chat-template", write_chat_template(folder, COMPACT))
        lm = OnnxLM(folder, fused=True, verify=True)
        kept = conversation(lm, True, args.turns, args.max_new_tokens, args.repeats)
        fresh = conversation(lm, False, args.turns, args.max_new_tokens, args.repeats)
    rows = "\n".join(f"| {t + 1} | {k[2]} | {k[1]} | {k[0]:.2f} | {f[1]} | {f[0]:.2f} |"
                     for t, (k, f) in enumerate(zip(kept, fresh)))
    name = args.export.resolve().name
    text = f"""## {name}: chat, time to first token by turn

`python benchmarks/chat_ttft.py {args.export}`: the same {args.turns}-turn conversation ({args.max_new_tokens} new
tokens per answer, greedy), median of {args.repeats} runs, fused fp32 graph, in-process (no HTTP). "kept": the
KV buffer lives across turns and a turn prefills only the tokens the cache does not hold; "fresh": the
whole history is prefilled every turn. The model's context is {lm.n_ctx} tokens.

| turn | prompt tokens | kept: prefilled | kept: TTFT ms | fresh: prefilled | fresh: TTFT ms |
| --- | --- | --- | --- | --- | --- |
{rows}
"""
    print(text)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from serve_load import write_section  # the section writer the load benchmark uses

    write_section(args.out, f"## {name}: chat", text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
