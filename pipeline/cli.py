"""`onnxgen`: a thin command line over the stages' entry points.

User mistakes (UserError) print one line and exit 2; a missed parity threshold exits 1."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from pipeline.errors import ParityError, UserError


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except ParityError as e:
            click.echo(f"parity failed: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr.")
def main(quiet: bool):
    """Train a GPT, export it to ONNX with a KV cache, check parity, and run it."""
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="onnxgen: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)


@main.command()
@click.option("--preset", default="small", show_default=True, help="models/NAME.json or a path to a preset file.")
@click.option("--corpus", default=None, help="A file, a folder or a glob of text. Default: Python's standard library.")
@click.option("--out", "out", type=click.Path(path_type=Path), default=None, help="Run folder [models/PRESET].")
@click.option("--steps", type=int, default=None, help="Override the preset's number of steps.")
@click.option("--batch-size", type=int, default=None)
@click.option("--lr", type=float, default=None)
@click.option("--seed", type=int, default=None)
@click.option("--vocab-size", type=int, default=None, help="Tokenizer vocabulary (preset default 8192).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--auto-resume", is_flag=True, help="Resume if --out has a checkpoint, else start a new run.")
@click.option("--force", is_flag=True, help="Delete a non-empty --out and start over.")
def train(preset, corpus, out, steps, batch_size, lr, seed, vocab_size, resume, auto_resume, force):
    """Train the tokenizer and the model on a corpus; write a run folder with checkpoints and loss.png."""
    from pipeline.train import checkpoint_dir
    from pipeline.train import train as train_run

    out = out or Path("models") / Path(preset).stem
    overrides = {k: v for k, v in dict(steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                                       vocab_size=vocab_size).items() if v is not None}
    if auto_resume:
        resume = checkpoint_dir(out) is not None
    state = train_run(out, preset=preset, corpus=corpus, resume=resume, force=force, overrides=overrides)
    click.echo(f"trained {out}: step {state['step']}, val loss {state['val_loss']:.4f}, "
               f"val ppl {__import__('math').exp(state['val_loss']):.2f}")


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=Path("exports/default"), show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing export folder.")
def export(checkpoint, out, force):
    """Export a trained run folder to ONNX (fp32, KV cache) with configs, tokenizer, parity and manifest."""
    from pipeline.export import export as export_run

    report = export_run(checkpoint, out, force=force)
    fp32 = report.results[0]
    click.echo(f"exported {out}: fp32 max |Δlogit| {fp32.max_abs:.2e}, greedy {fp32.greedy_match}/"
               f"{fp32.greedy_tokens} identical")


@main.command()
@click.argument("export_dir", metavar="EXPORT", type=click.Path(path_type=Path))
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="The PyTorch source [the one recorded in the manifest].")
@click.option("--variant", "variants", multiple=True, help="Variants to check [all present].")
def parity(export_dir, checkpoint, variants):
    """Compare the export's ONNX variants with the PyTorch model; write parity.json and parity.md."""
    from pipeline.parity import check_export

    report = check_export(export_dir, checkpoint, list(variants) or None)
    click.echo(report.markdown())
    if not report.passed:
        raise ParityError(f"{export_dir}: " + "; ".join(f"{r.variant}: {f}" for r in report.results for f in r.failures))


@main.command()
@click.argument("export_dir", metavar="EXPORT", type=click.Path(path_type=Path))
@click.argument("prompt", required=False)
@click.option("--prompt-file", type=click.Path(path_type=Path), default=None, help="Read the prompt from a file.")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path), default=None,
              help="Several prompts, generated as one batch: a text file (one per line) or .jsonl "
                   "({\"prompt\": ...} per line). Prints one JSON line per prompt.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--temperature", type=float, default=None, help="0 (the default) is greedy; > 0 samples.")
@click.option("--top-k", type=int, default=0, show_default=True)
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--repetition-penalty", type=float, default=1.0, show_default=True)
@click.option("--stop", multiple=True, help="Stop a row when it produces this string (repeatable).")
@click.option("--seed", type=int, default=None)
@click.option("--variant", default=None, help="fp32, fp16, int8 or int4 [fp32 on cpu, fp16 on cuda].")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--fused/--plain", "fused", default=None,
              help="The fused attention graph (onnxgen fuse) or the plain one [fused when the export has it].")
@click.option("--threads", type=int, default=0, help="ONNX Runtime intra-op threads [all cores].")
@click.option("--echo/--no-echo", default=True, show_default=True, help="Print the prompt before the completion.")
def run(export_dir, prompt, prompt_file, prompts_file, max_new_tokens, temperature, top_k, top_p,
        repetition_penalty, stop, seed, variant, device, fused, threads, echo):
    """Generate from PROMPT ('-' reads stdin) with ONNX Runtime, streaming tokens as they come."""
    import json

    from pipeline.runtime import Generation, OnnxLM, read_prompts
    from pipeline.sampling import SamplingConfig

    batch = None
    if prompts_file is not None:
        if prompt is not None or prompt_file is not None:
            raise UserError("--prompts: give PROMPT, --prompt-file or --prompts, not several")
        batch = read_prompts(prompts_file)
    elif prompt_file is not None:
        if prompt is not None:
            raise UserError("prompt: give PROMPT or --prompt-file, not both")
        try:
            prompt = prompt_file.read_text()
        except (FileNotFoundError, IsADirectoryError):
            raise UserError(f"--prompt-file {prompt_file}: file does not exist") from None
    elif prompt == "-" or (prompt is None and not sys.stdin.isatty()):
        prompt = sys.stdin.read()
    if prompt is None and batch is None:
        raise UserError("prompt: missing (give PROMPT, --prompt-file FILE, --prompts FILE, or '-' to read stdin)")
    if temperature is None:
        temperature = 1.0 if (top_k or top_p < 1.0) else 0.0  # asking for top-k/top-p means sampling
    sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                              repetition_penalty=repetition_penalty)
    variant = variant or ("fp16" if device == "cuda" else "fp32")
    lm = OnnxLM(export_dir, variant=variant, provider=device, threads=threads,
                fused="auto" if fused is None else fused)
    result = Generation()
    if batch is not None:
        texts = lm.complete(batch, max_new_tokens=max_new_tokens, sampling=sampling, stop=list(stop), result=result)
        for p, text, reason in zip(batch, texts, result.stop_reason):
            click.echo(json.dumps({"prompt": p, "completion": text, "stop_reason": reason}, ensure_ascii=False))
        return
    if echo:
        click.echo(prompt, nl=False)
    for piece in lm.stream(prompt, max_new_tokens=max_new_tokens, sampling=sampling, result=result, stop=list(stop)):
        click.echo(piece, nl=False)
    click.echo()
    if result.stop_reason and result.stop_reason[0] == "context":
        click.echo(f"onnxgen: stopped at the model's context length ({lm.n_ctx} tokens)", err=True)


@main.command()
@click.argument("export_dir", metavar="EXPORT", type=click.Path(path_type=Path))
@click.option("--variant", "variants", multiple=True, help="Variants to fuse [all present].")
def fuse(export_dir, variants):
    """Write each variant's fused-attention twin (onnx/*_gqa.onnx: GroupQueryAttention, shared KV buffer)."""
    from pipeline.fuse import fuse_export

    for rel in fuse_export(export_dir, list(variants) or None):
        click.echo(f"wrote {export_dir / rel}")


@main.command()
@click.argument("export_dir", metavar="EXPORT", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=Path("benchmarks/RESULTS.md"), show_default=True)
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--tokens", type=click.IntRange(min=8), default=128, show_default=True, help="Decode tokens per round.")
@click.option("--threads", type=int, default=0, help="Intra-op threads for every engine [all cores].")
@click.option("--batch", "batches", type=int, multiple=True, help="Batch sizes [1 and 16].")
@click.option("--engines", default=None, help="Comma-separated subset (torch, optimum, genai, onnxgen).")
def bench(export_dir, out, rounds, tokens, threads, batches, engines):
    """Decode tok/s, 256-token prefill, peak RSS: onnxgen's variants against PyTorch, Optimum, genai."""
    from pipeline.bench import bench as run_bench

    run_bench(export_dir, out, rounds=rounds, tokens=tokens, threads=threads, batches=list(batches) or [1, 16],
              engines=engines.split(",") if engines else None)
    click.echo(f"wrote {out}")


@main.command("to-hf")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True)
def to_hf(checkpoint, out):
    """Write a trained run as a transformers GPT2LMHeadModel folder (safetensors + tokenizer)."""
    from pipeline.huggingface import save_gpt2
    from pipeline.tokenizer import load_tokenizer, write_hf_tokenizer_files
    from pipeline.train import load_model

    if out.exists():
        raise UserError(f"--out {out}: exists")
    model = load_model(checkpoint)
    out.mkdir(parents=True)
    save_gpt2(model, out)
    write_hf_tokenizer_files(load_tokenizer(checkpoint), out, model.config.n_ctx)
    click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()
