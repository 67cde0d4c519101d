"""`onnxgen`: a thin command line over the stages' entry points.

User mistakes (UserError) print one line and exit 2; a missed parity threshold exits 1."""
from __future__ import annotations

import errno
import logging
import os
import sys
from pathlib import Path

import click

from pipeline.convert.quantize import recipe as recipes  # the choices, no onnx: start-up stays fast
from pipeline.errors import ParityError, UserError


# A full disk, a read-only or forbidden place: the machine's state, not a bug; one line, exit 1.
_ENVIRONMENT_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


# The options several commands share, written once.
def variant_option(default: str | None = None, help: str = "fp32, fp16, int8 or int4 [fp32 on cpu, fp16 on cuda]."):
    return click.option("--variant", default=default, show_default=default is not None, help=help)


threads_option = click.option("--threads", type=click.IntRange(min=0), default=0,
                              help="ONNX Runtime intra-op threads [all cores].")
device_option = click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)


def constraint_options(command):
    """--json-schema, --json, --regex, --grammar: what `run` and `chat` constrain an answer to."""
    for option in reversed([
            click.option("--json-schema", "json_schema", type=click.Path(path_type=Path), default=None, metavar="FILE",
                         help="Constrain the answer to this JSON schema (llguidance; compact JSON)."),
            click.option("--json", "json_object", is_flag=True, help="Constrain the answer to a JSON object."),
            click.option("--regex", default=None, metavar="RE", help="Constrain the answer to this regular expression."),
            click.option("--grammar", type=click.Path(path_type=Path), default=None, metavar="FILE.lark",
                         help="Constrain the answer to this Lark grammar (llguidance's syntax).")]):
        command = option(command)
    return command


speculate_option = click.option(
    "--speculate/--no-speculate", default=None,
    help="Prompt lookup: draft the next tokens from text that came before and check them in one call [on when "
         "greedy on fp32, where the tokens are the same; when sampling it keeps the model's distribution, not a "
         "seed's draws; int4/int8 kernels round a multi-token check differently, so near-ties can go another way].")

def draft_options(command):
    """--draft EXPORT and --draft-variant: a smaller export with the same tokenizer drafts for speculation."""
    command = click.option("--draft-variant", default=None,
                           help="The draft's variant [int4 when it has one, else fp32].")(command)
    return click.option("--draft", "draft_dir", type=click.Path(path_type=Path), default=None, metavar="EXPORT",
                        help="Speculate with this smaller export's greedy tokens as drafts (same tokenizer).")(command)


def load_draft(lm, draft_dir, draft_variant, threads, verify):
    if draft_dir is None:
        return None
    from pipeline.exports import variant_path
    from pipeline.run.lm import OnnxLM
    from pipeline.run.speculative import same_tokenizer

    variant = draft_variant or ("int4" if variant_path(draft_dir, "int4").is_file() else "fp32")
    try:
        draft = OnnxLM(draft_dir, variant=variant, threads=threads, verify=verify, fused="auto")
    except UserError as e:  # the draft's, not the target's: say so
        raise UserError(f"--draft {draft_dir}: {str(e).replace('--variant', '--draft-variant')}") from None
    same_tokenizer(lm, draft)
    return draft


unsafe_skip_verify_option = click.option(
    "--unsafe-skip-verify", is_flag=True,
    help="Do not check the files' sha256 against manifest.json (unsafe: runs whatever is there).")


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except click.UsageError as e:  # a bad option value: one line too, not click's four
            where = f" (see '{e.ctx.command_path} -h')" if e.ctx else ""
            click.echo(f"error: {e.format_message()}{where}", err=True)
            sys.exit(e.exit_code)
        except ParityError as e:
            click.echo(f"parity failed: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as Unix tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # or the exit's flush fails again
            sys.exit(141)
        except OSError as e:
            if e.errno not in _ENVIRONMENT_ERRORS:
                raise  # anything else is a bug: keep its traceback
            click.echo(f"error: {e.filename or 'output'}: {e.strerror}", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr.")
@click.option("-v", "--verbose", is_flag=True, help="Every step's detail, the libraries' logs too.")
def main(quiet: bool, verbose: bool):
    """Train a GPT, export it to ONNX with a KV cache, check parity, and run it."""
    # Quiet by default: each stage prints a progress bar and a one-line summary. -v brings back the detail,
    # and the libraries' own logs (onnxruntime.quantization logs every node it visits at INFO).
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="onnxgen: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("pipeline").setLevel(logging.WARNING if quiet else logging.INFO if verbose else logging.WARNING)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)


NO_MEMORY_CHECK = click.option(
    "--no-memory-check", is_flag=True,
    help="Go on when the estimated peak memory is more than this machine has free (export: with --hf/--gguf).")


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
    from pipeline.train.ddp import is_main
    from pipeline.train.loop import train as train_run
    from pipeline.train.runs import checkpoint_dir

    out = out or Path("models") / Path(preset).stem
    overrides = {k: v for k, v in dict(steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                                       vocab_size=vocab_size).items() if v is not None}
    if auto_resume:
        resume = checkpoint_dir(out) is not None
        # a run killed before its first checkpoint has nothing to resume: start it again
        force = force or (not resume and (out / "train.json").is_file())
    state = train_run(out, preset=preset, corpus=corpus, resume=resume, force=force, overrides=overrides)
    if not is_main():  # under torchrun: one report, from rank 0
        return
    click.echo(f"trained {out}: step {state['step']}, val loss {state['val_loss']:.4f}, "
               f"val ppl {__import__('math').exp(state['val_loss']):.2f}")


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), required=True,
              help='Plain text, or JSONL of {"prompt": ..., "completion": ...} (loss on the completion only).')
@click.option("--method", type=click.Choice(["full", "lora"]), default="lora", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Run folder [CHECKPOINT-METHOD].")
@click.option("--rank", type=int, default=None, help="LoRA rank [8].")
@click.option("--alpha", type=float, default=None, help="LoRA alpha; the update is scaled by alpha/rank [16].")
@click.option("--dropout", type=float, default=None, help="LoRA dropout [0.05].")
@click.option("--target-modules", default=None, help="LoRA targets, comma-separated [c_attn,c_proj,c_fc].")
@click.option("--steps", type=int, default=None, help="Steps [200].")
@click.option("--batch-size", type=int, default=None, help="[the base run's]")
@click.option("--block-size", type=int, default=None, help="Longest window or example, in tokens [the base run's].")
@click.option("--lr", type=float, default=None, help="Peak learning rate [full 1e-4, lora 1e-3].")
@click.option("--seed", type=int, default=None)
@click.option("--resume", is_flag=True, help="Continue the fine-tune in --out from its last checkpoint.")
@click.option("--force", is_flag=True, help="Delete a non-empty --out and start over.")
def finetune(checkpoint, data, method, out, rank, alpha, dropout, target_modules, steps, batch_size, block_size,
             lr, seed, resume, force):
    """Fine-tune a trained run on your text (full or LoRA); writes a run folder that `export` takes."""
    import math

    from pipeline.train.ddp import is_main
    from pipeline.train.finetune import LoraSettings
    from pipeline.train.finetune import finetune as finetune_run

    lora_given = {k: v for k, v in dict(rank=rank, alpha=alpha, dropout=dropout).items() if v is not None}
    if target_modules is not None:
        lora_given["target_modules"] = tuple(t.strip() for t in target_modules.split(",") if t.strip())
    lora = LoraSettings(**lora_given) if lora_given else None
    overrides = {k: v for k, v in dict(steps=steps, batch_size=batch_size, block_size=block_size, lr=lr,
                                       seed=seed).items() if v is not None}
    state = finetune_run(checkpoint, data, out, method=method, lora=lora, resume=resume, force=force,
                         overrides=overrides)
    if not is_main():
        return
    click.echo(f"fine-tuned {out or checkpoint.parent / f'{checkpoint.name}-{method}'} ({method}, "
               f"{state['trainable_parameters']:,} trainable parameters): step {state['step']}, val loss "
               f"{state['val_loss_before']:.4f} -> {state['val_loss']:.4f}, val ppl {math.exp(state['val_loss']):.2f}")


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path), required=False)
@click.option("--out", type=click.Path(path_type=Path), default=Path("exports/default"), show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing export folder.")
@click.option("--hf", "hf", type=click.Path(path_type=Path), default=None,
              help="Import a local transformers causal-LM folder instead: gpt2, llama, mistral, smollm3, granite, qwen2, "
                   "qwen3, phi3, gemma, gemma2, gemma3_text, olmo2, olmo3, gpt_neox, phi, opt, mixtral, qwen3_moe, gpt_oss, "
                   "lfm2, granitemoehybrid, qwen3_5_text (others fall back "
                   "to optimum, plain graph only).")
@click.option("--gguf", "gguf", type=click.Path(path_type=Path), default=None,
              help="Import a llama.cpp GGUF file (llama, qwen2; dequantized to fp32) instead.")
@click.option("--corpus", default=None, help="With --hf/--gguf: text for the parity windows [Python's standard library].")
@NO_MEMORY_CHECK
def export(checkpoint, out, force, hf, gguf, corpus, no_memory_check):
    """Export a trained run folder (or, with --hf, a Hugging Face model; with --gguf, a GGUF file) to ONNX
    (fp32, KV cache) with configs, tokenizer, genai_config.json, parity and manifest."""
    if sum(x is not None for x in (checkpoint, hf, gguf)) != 1:
        raise UserError("export: give a CHECKPOINT run folder, --hf DIR or --gguf FILE (one of them)")
    if corpus is not None and hf is None and gguf is None:
        raise UserError("--corpus: only used with --hf or --gguf (an onnxgen run holds out its own data)")
    if hf is not None or gguf is not None:  # refused in a blink: read before torch and transformers are imported
        from pipeline.preflight import check_memory, export_peak

        if hf is not None:
            from pipeline.model.families import check_hf_folder, fp32_weight_bytes

            check_hf_folder(hf)
            weights = fp32_weight_bytes(hf)
        else:
            from pipeline.model.gguf import fp32_weight_bytes

            weights = fp32_weight_bytes(gguf)
        check_memory(export_peak(weights), f"export {hf or gguf} ({weights / 1e9:.2f} GB of fp32 weights)",
                     skip=no_memory_check)
    from pipeline.convert.export import export as export_run
    from pipeline.convert.hf_import import export_gguf, export_hf

    if gguf is not None:
        report = export_gguf(gguf, out, force=force, corpus=corpus)
    elif hf is not None:
        report = export_hf(hf, out, force=force, corpus=corpus)
    else:
        report = export_run(checkpoint, out, force=force)
    fp32 = report.results[0]
    click.echo(f"exported {out}: fp32 max |Δlogit| {fp32.max_abs:.2e}, KL {fp32.kl_mean:.1e} over {fp32.scored} "
               f"tokens, greedy {fp32.greedy_match}/{fp32.greedy_tokens} identical")


@main.command()
@click.argument("export_dir", metavar="EXPORT", type=click.Path(path_type=Path))
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="The PyTorch source [the one recorded in the manifest].")
@click.option("--variant", "variants", multiple=True, help="Variants to check [all present].")
@click.option("--tokens", type=click.IntRange(min=64), default=None,
              help="Scored positions per graph, at least [8192, over at least 32 windows].")
@NO_MEMORY_CHECK
def parity(export_dir, checkpoint, variants, tokens, no_memory_check):
    """Compare the export's ONNX graphs (variants and fused twins) with the PyTorch model; write
    parity.json, parity.md and parity.png, and print the table."""
    from pipeline.check.parity import MIN_SCORED, check_export
    from pipeline.preflight import check_stage_memory

    check_stage_memory(export_dir, "parity", skip=no_memory_check)

    report = check_export(export_dir, checkpoint, list(variants) or None, min_scored=tokens or MIN_SCORED,
                          progress=sys.stderr.isatty())
    click.echo(f"parity of {export_dir} against {report.source}: {report.windows} windows of "
               f"{report.window_length} tokens (details: {export_dir / 'parity.md'})")
    click.echo(report.table())
    if not report.passed:
        raise ParityError(f"{export_dir}: " + "; ".join(f"{r.variant}: {f}" for r in report.results for f in r.failures))
    click.echo(f"\ntry it: onnxgen run {export_dir} \"import os\"   (--variant int4 for the smallest)")


@main.command()
@click.argument("export_dir", metavar="EXPORT", type=click.Path(path_type=Path))
@click.option("--variant", type=click.Choice([*recipes.QUANTIZED, "all"]), default="all", show_default=True)
@click.option("--recipe", "preset", type=click.Choice(recipes.RECIPE_PRESETS), default="default", show_default=True,
              help="int4's starting recipe, before the options below: default (quality per MB: 8-bit q/k/v, "
                   "first/last blocks, outer down projections, head at block 16 for imports) or fast (every tensor "
                   "4-bit at block 64, head included: smaller, faster to decode, less faithful; "
                   "benchmarks/REAL_MODEL.md).")
@click.option("--int8-mode", type=click.Choice(recipes.INT8_MODES), default=recipes.DEFAULT_INT8_MODE,
              help="int8 method [blockwise]: MatMulNBits 8-bit, block 32; dynamic: per-channel weights, "
                   "per-tensor activations at run time; static: QDQ calibrated on held-out windows.")
@click.option("--head", type=click.Choice(recipes.HEADS), default=None,
              help="LM head (and tied embedding) precision in the int4 variant [int8].")
@click.option("--method", type=click.Choice(recipes.METHODS), default=None,
              help="int4/int8 weights: rtn round to nearest, hqq (data-free, zero points), gptq (calibrated on "
                   "--calibration) [the export's default recipe: docs in pipeline/convert/quantize.py].")
@click.option("--block-size", type=click.Choice([str(b) for b in recipes.BLOCKS]), default=None,
              help="Weights per scale [the default recipe's].")
@click.option("--head-block-size", type=click.Choice([str(b) for b in recipes.BLOCKS]), default=None,
              help="Weights per scale in the head and a tied embedding [--block-size].")
@click.option("--symmetric/--asymmetric", default=None, help="Zero points or not (rtn, gptq) [the default recipe's].")
@click.option("--act-order/--no-act-order", default=None,
              help="gptq: solve input channels by decreasing activation energy [the default recipe's].")
@click.option("--grid-search/--no-grid-search", default=None,
              help="gptq: shrink each block's range to the one with the least activation-weighted error "
                   "[the default recipe's].")
@click.option("--scales", type=click.Choice(recipes.SCALES), default=None,
              help="How the file stores the scales: fp16 (half the bytes, cast back to fp32 when onnxruntime "
                   "loads it) or fp32 [fp16].")
@click.option("--accuracy-level", type=click.Choice([str(a) for a in recipes.ACCURACY_LEVELS]), default=None,
              help="MatMulNBits compute on CPU: 4 int8 activations, 0/1 fp32 [the default recipe's].")
@click.option("--eight-bit", multiple=True, metavar="SELECTOR",
              help="Body tensors kept at 8 bits in int4 (repeatable): first_last, block:0,29, qkv, o, gate_up, "
                   "down, a kind with layers (down:0-3,27; down:outer, the first and last sixth), or none [the default recipe's].")
@click.option("--calibration", type=click.Path(path_type=Path), default=None,
              help="GPTQ calibration text file [the export's recorded corpus, or the source run's training split].")
@click.option("--calibration-windows", type=click.IntRange(min=1), default=None,
              help="GPTQ: seeded windows of calibration text [128].")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="Source run for static calibration [the one recorded in the manifest].")
@NO_MEMORY_CHECK
def quantize(export_dir, variant, preset, int8_mode, head, method, block_size, head_block_size, symmetric, act_order,
             grid_search, scales, accuracy_level, eight_bit, calibration, calibration_windows, checkpoint,
             no_memory_check):
    """Add or rebuild quantized variants (int8, int4, fp16) from onnx/model.onnx; run `onnxgen parity` after."""
    from pipeline.convert.quantize import quantize as quantize_export
    from pipeline.exports import VARIANTS
    from pipeline.preflight import check_stage_memory

    check_stage_memory(export_dir, "quantize", skip=no_memory_check)

    overrides = dict(method=method, block_size=int(block_size) if block_size else None, head=head,
                     head_block=int(head_block_size) if head_block_size else None, symmetric=symmetric,
                     act_order=act_order, grid_search=grid_search, scales=scales,
                     accuracy_level=int(accuracy_level) if accuracy_level else None,
                     eight_bit=tuple(eight_bit) if eight_bit else None)
    done = quantize_export(export_dir, variant, overrides, preset=preset, int8_mode=int8_mode, calibration=calibration,
                           calibration_windows=calibration_windows, checkpoint=checkpoint,
                           progress=sys.stderr.isatty())
    for v, d in done.items():
        click.echo(f"{export_dir}/onnx/{VARIANTS[v]}: {v} ({d['method']}), {d['bytes'] / 1e6:.2f} MB")


@main.command()
@click.argument("export_dir", metavar="EXPORT", type=click.Path(path_type=Path))
@click.argument("prompt", required=False)
@click.option("--prompt-file", type=click.Path(path_type=Path), default=None, help="Read the prompt from a file.")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path), default=None,
              help="Several prompts, generated as one batch: a text file (one per line) or .jsonl "
                   "({\"prompt\": ...} per line). Prints one JSON line per prompt.")
@click.option("--chat", "chat_file", default=None, metavar="FILE",
              help='Messages as JSON ([{"role": ..., "content": ...}], a file or - for stdin), rendered with the '
                   "model's chat template; prints the assistant's answer.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--temperature", type=float, default=None,
              help="0 is greedy; > 0 samples [the export's generation_config.json, as transformers reads it].")
@click.option("--top-k", type=int, default=None, help="0 is off [generation_config.json].")
@click.option("--top-p", type=float, default=None, help="1 is off [generation_config.json].")
@click.option("--repetition-penalty", type=float, default=None, help="1 is off [generation_config.json].")
@click.option("--stop", multiple=True, help="Stop a row when it produces this string (repeatable).")
@click.option("--seed", type=int, default=None)
@variant_option()
@device_option
@click.option("--fused/--plain", "fused", default=None,
              help="The fused attention graph (onnxgen fuse) or the plain one [fused when the export has it].")
@threads_option
@constraint_options
@click.option("--echo/--no-echo", default=True, show_default=True, help="Print the prompt before the completion.")
@click.option("--special-tokens/--no-special-tokens", default=True, show_default=True,
              help="Encode text prompts as transformers does, with the special tokens the export's tokenizer adds "
                   "(a BOS where it declares one); --no-special-tokens feeds the bare text (raw continuations). "
                   "--chat templates write their own.")
@speculate_option
@draft_options
@click.option("--stats", is_flag=True, help="At the end, print load time, time to first token and tokens/s on stderr "
                                            "(and how many drafted tokens speculation kept).")
@unsafe_skip_verify_option
def run(export_dir, prompt, prompt_file, prompts_file, chat_file, max_new_tokens, temperature, top_k, top_p,
        repetition_penalty, stop, seed, variant, device, fused, threads, json_schema, json_object, regex, grammar, echo,
        special_tokens, speculate, draft_dir, draft_variant, stats, unsafe_skip_verify):
    """Generate from PROMPT ('-' reads stdin) with ONNX Runtime, streaming tokens as they come."""
    import json
    import time

    import numpy as np

    from pipeline.run.lm import Generation, OnnxLM
    from pipeline.run.sampling import SamplingConfig
    from pipeline.run.text import read_prompts
    from pipeline.tokenizer import check_text

    constraint = None
    if json_schema is not None or json_object or regex is not None or grammar is not None:
        from pipeline.run.guidance import constraint_from_options

        constraint = constraint_from_options(json_schema, json_object, regex, grammar)  # checked before the load
    batch = messages = None
    if chat_file is not None:
        from pipeline.run.chat import read_messages

        if prompt is not None or prompt_file is not None or prompts_file is not None:
            raise UserError("--chat: give PROMPT, --prompt-file, --prompts or --chat, not several")
        messages = read_messages(chat_file)
        prompt, echo = "", False
    elif prompts_file is not None:
        if prompt is not None or prompt_file is not None:
            raise UserError("--prompts: give PROMPT, --prompt-file or --prompts, not several")
        batch = read_prompts(prompts_file)
    elif prompt_file is not None:
        if prompt is not None:
            raise UserError("prompt: give PROMPT or --prompt-file, not both")
        try:
            prompt = prompt_file.read_bytes().decode("utf-8")
        except (FileNotFoundError, IsADirectoryError):
            raise UserError(f"--prompt-file {prompt_file}: file does not exist") from None
        except UnicodeDecodeError as e:
            raise UserError(f"--prompt-file {prompt_file}: not UTF-8 text (byte {e.start})") from None
    elif prompt == "-" or (prompt is None and not sys.stdin.isatty()):
        prompt = sys.stdin.read()
    if prompt is None and batch is None:
        raise UserError("prompt: missing (give PROMPT, --prompt-file FILE, --prompts FILE, or '-' to read stdin)")
    for i, text in enumerate(batch or [prompt]):
        check_text(text, f"prompt {i + 1}" if batch else "prompt")
    variant = variant or ("fp16" if device == "cuda" else "fp32")
    started = time.perf_counter()
    lm = OnnxLM(export_dir, variant=variant, provider=device, threads=threads, verify=not unsafe_skip_verify,
                fused="auto" if fused is None else fused, special_tokens=special_tokens)
    draft = load_draft(lm, draft_dir, draft_variant, threads, not unsafe_skip_verify)
    loaded = time.perf_counter()
    what = f"onnxgen: {lm.variant}{' fused' if lm.fused else ''} loaded in {(loaded - started) * 1e3:.0f} ms"  # --stats
    sampling = SamplingConfig.from_defaults(lm.sampling_defaults, temperature=temperature, top_k=top_k, top_p=top_p,
                                            repetition_penalty=repetition_penalty, seed=seed)
    result = Generation()
    if messages is not None:
        from pipeline.run.chat import ChatFormat

        chat = ChatFormat.of(lm)
        prompt = chat.encode(messages)
        lm.eos_ids = np.union1d(lm.eos_ids, chat.stop_ids()).astype(np.int64)  # the template's end of turn too
    if batch is not None:
        texts = lm.complete(batch, max_new_tokens=max_new_tokens, sampling=sampling, stop=list(stop), result=result,
                            constraint=constraint, speculate=speculate, draft=draft)
        for p, text, reason in zip(batch, texts, result.stop_reason):
            click.echo(json.dumps({"prompt": p, "completion": text, "stop_reason": reason}, ensure_ascii=False))
        if stats:
            n = sum(len(t) for t in result.tokens)
            click.echo(f"{what}; {len(batch)} prompts, {n} tokens in {time.perf_counter() - loaded:.2f} s"
                       + speculation_stats(result), err=True)
        return
    if echo:
        click.echo(prompt, nl=False)
    first = None
    # the stream itself, not click.echo: echo asks the terminal (an ioctl) and scans for ANSI codes on every
    # call, ~15 us a token, 2-3% of a step of the small preset; what the model writes is passed on as it is
    out = sys.stdout
    for piece in lm.stream(prompt, max_new_tokens=max_new_tokens, sampling=sampling, result=result, stop=list(stop),
                           constraint=constraint, speculate=speculate, draft=draft):
        first = first or time.perf_counter()
        out.write(piece)
        out.flush()
    end = time.perf_counter()
    click.echo()
    if result.stop_reason and result.stop_reason[0] == "context":
        click.echo(f"onnxgen: stopped at the model's context length ({lm.n_ctx} tokens)", err=True)
    if stats:
        n = len(result.tokens[0]) if result.tokens else 0
        rate = f", {(n - 1) / (end - first):.0f} tok/s after it" if first and n > 1 and end > first else ""
        ttft = f"first text after {(first - loaded) * 1e3:.1f} ms" if first else "no text"
        click.echo(f"{what}; {ttft}; {n} tokens{rate}" + speculation_stats(result), err=True)


def speculation_stats(result) -> str:
    return f"; {result.speculation.describe()}" if result.speculation is not None else ""


@main.command()
@click.argument("export_dir", metavar="EXPORT", type=click.Path(path_type=Path))
@click.option("--system", default=None, help="The system prompt (also: /system TEXT in the chat).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 is greedy; > 0 samples.")
@click.option("--top-k", type=int, default=0, show_default=True)
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=None)
@variant_option()
@device_option
@threads_option
@constraint_options
@speculate_option
@draft_options
@click.option("--stats", is_flag=True, help="After each answer, print time to first token and tokens/s on stderr.")
@unsafe_skip_verify_option
def chat(export_dir, system, max_new_tokens, temperature, top_k, top_p, seed, variant, device, threads, json_schema,
         json_object, regex, grammar, speculate, draft_dir, draft_variant, stats, unsafe_skip_verify):
    """Chat in the terminal with the model's chat template: answers stream, the KV cache is kept across
    turns (fused graphs). /reset, /system TEXT, /exit; Ctrl-C stops an answer, Ctrl-D quits."""
    from pipeline.run.chat import ChatSession
    from pipeline.run.lm import OnnxLM
    from pipeline.run.sampling import SamplingConfig
    from pipeline.tokenizer import check_text

    sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    constraint = None
    if json_schema is not None or json_object or regex is not None or grammar is not None:
        from pipeline.run.guidance import constraint_from_options

        constraint = constraint_from_options(json_schema, json_object, regex, grammar)
    lm = OnnxLM(export_dir, variant=variant or ("fp16" if device == "cuda" else "fp32"), provider=device,
                threads=threads, verify=not unsafe_skip_verify, fused="auto")
    session = ChatSession(lm, system=system, sampling=sampling, max_new_tokens=max_new_tokens, constraint=constraint,
                          speculate=speculate, draft=load_draft(lm, draft_dir, draft_variant, threads,
                                                                not unsafe_skip_verify))
    interactive = sys.stdin.isatty()
    if interactive:
        click.echo(f"chat with {export_dir} ({'fused, cache kept across turns' if lm.fused else 'plain graph'}): "
                   "/reset, /system TEXT, /exit, /help; Ctrl-C stops an answer, Ctrl-D quits", err=True)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:  # at the prompt: a fresh line, as shells do
            click.echo()
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/") and not text.startswith("//"):  # a command, never sent to the model
            command, _, arg = text.partition(" ")
            if command in ("/exit", "/quit"):
                break
            if command == "/reset":
                session.reset()
                click.echo("(conversation reset)")
            elif command == "/system":
                session.reset(system=arg.strip())
                click.echo("(system prompt set; conversation reset)" if session.system else "(system prompt cleared)")
            else:
                unknown = "" if command in ("/help", "/?") else f"unknown command {command}: "
                click.echo(unknown + "/reset, /system TEXT (empty: none), /exit; a message that starts with / is "
                           "typed with //", err=True)
            continue
        if text.startswith("//"):
            line = line.replace("//", "/", 1)
        pieces = session.reply(check_text(line, "message"))
        try:
            for piece in pieces:
                click.echo(piece, nl=False)
        except KeyboardInterrupt:
            pieces.close()  # the partial answer stays in the history, the cache stays usable
            click.echo(" [stopped]", nl=False)
        click.echo()
        if stats:
            t = session.turns[-1]
            rate = t.generated / max(t.seconds - t.ttft_s, 1e-9) if t.generated > 1 else 0.0
            click.echo(f"turn {len(session.turns)}: time to first token {t.ttft_s * 1000:.1f} ms, prefilled "
                       f"{t.prefilled}, reused {t.reused}, {t.generated} tokens, {rate:.0f} tok/s"
                       + (f"; {t.speculation.describe()}" if t.speculation is not None else ""), err=True)


@main.command()
@click.argument("export_dir", metavar="EXPORT", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--model-name", default=None, help="The name clients ask for [the export folder's name].")
@click.option("--max-batch", type=click.IntRange(min=1), default=16, show_default=True,
              help="Requests decoded together (rows of the shared KV buffer).")
@click.option("--max-queue", type=click.IntRange(min=0), default=64, show_default=True,
              help="Requests waiting for a row; beyond batch + queue a request gets 429.")
@variant_option("fp32", "fp32, fp16, int8 or int4 (its fused twin).")
@threads_option
@click.option("--kv-cache-gb", type=click.FloatRange(min=0, min_open=True), default=2.0, show_default=True,
              help="Memory for the KV cache, committed at start; a request's prompt + max_tokens may use what "
                   "--max-batch rows of it hold, up to the model's context.")
# 1 GB by default: unlike the KV cache it is taken only as prompts fill it, and it holds 21k tokens of SmolLM2-135M's
# K/V (46 KB a token): 40 different 512-token system prompts, at half the default --kv-cache-gb
@click.option("--prefix-cache-gb", type=float, default=1.0, show_default=True,
              help="Memory for the K/V of prompt prefixes already computed (a shared system prompt is prefilled "
                   "once, then copied), in 64-token blocks, least recently used first out; taken as it fills. 0: off.")
@unsafe_skip_verify_option
def serve(export_dir, host, port, model_name, max_batch, max_queue, variant, threads, kv_cache_gb, prefix_cache_gb,
          unsafe_skip_verify):
    """An OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, /v1/models) with continuous
    batching over the fused graph (onnxgen fuse)."""
    from pipeline.run.lm import OnnxLM
    from pipeline.run.batching import kv_context
    from pipeline.run.serve import serve as run_server

    if not prefix_cache_gb >= 0:  # also NaN
        raise UserError(f"--prefix-cache-gb {prefix_cache_gb}: expected 0 (off) or more")
    # no spinning: the server's HTTP side and its clients need the cores between steps
    lm = OnnxLM(export_dir, variant=variant, threads=threads, verify=not unsafe_skip_verify, fused=True, spin=False)
    context = kv_context(lm, max_batch, kv_cache_gb * 1e9)
    if context < 2:
        raise UserError(f"--kv-cache-gb {kv_cache_gb}: holds {context} position(s) for each of --max-batch "
                        f"{max_batch} rows (expected room for a prompt and a token: raise it or lower --max-batch)")
    # the name as the user gave the folder (abspath settles '.' and a trailing slash but keeps a symlink's name:
    # `serve exports/latest` answers to `latest`, not to whatever the link points at)
    name = model_name or Path(os.path.abspath(export_dir)).name
    limit = "the model's" if context == lm.n_ctx else f"of {lm.n_ctx}, as {kv_cache_gb:g} GB of KV cache holds"
    click.echo(f"serving {export_dir} as `{name}` on http://{host}:{port}/v1 (batch {max_batch}, queue {max_queue}, "
               f"context {context} tokens: {limit}; prefix cache "
               f"{f'{prefix_cache_gb:g} GB' if prefix_cache_gb else 'off'})", err=True)
    run_server(lm, name, host=host, port=port, capacity=max_batch, max_waiting=max_queue, context=context,
               prefix_cache_bytes=prefix_cache_gb * 1e9)


@main.command()
@click.argument("export_dir", metavar="EXPORT", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True, help="0: any free port.")
def web(export_dir, host, port):
    """Serve EXPORT and a page that runs it in the browser (transformers.js: WASM, or WebGPU where the
    browser has it). A link starts a run: /?prompt=...&max_new_tokens=N&dtype=fp32|q8|q4|fp16&do_sample=0"""
    from pipeline.run.web.server import make_server, url_of

    server = make_server(export_dir, host, port)
    click.echo(f"serving {export_dir} at {url_of(server)}  (Ctrl-C stops)")
    sys.stdout.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        click.echo("stopped", err=True)
    finally:
        server.server_close()


@main.command()
@click.argument("export_dir", metavar="EXPORT", type=click.Path(path_type=Path))
@variant_option("fp32", "fp32, fp16, int8 or int4.")
@click.option("--fused/--plain", default=False, show_default=True,
              help="The variant's fused twin (onnxgen fuse: GroupQueryAttention over a shared KV buffer, what "
                   "genai's own builder makes; faster) or its plain contract graph (any execution provider).")
def genai(export_dir, variant, fused):
    """Point the export's genai_config.json (onnxruntime-genai) at another variant."""
    from pipeline.convert.genai import named_graph, use_variant

    path = use_variant(export_dir, variant, fused)
    click.echo(f"wrote {path}: onnxruntime-genai now runs {named_graph(export_dir)}")


@main.command()
@click.argument("export_dir", metavar="EXPORT", type=click.Path(path_type=Path))
@click.option("--variant", "variants", multiple=True, help="Variants to fuse [all present].")
@NO_MEMORY_CHECK
def fuse(export_dir, variants, no_memory_check):
    """Write each variant's fused-attention twin (onnx/*_gqa.onnx: GroupQueryAttention, shared KV buffer)."""
    from pipeline.convert.fuse import fuse_export
    from pipeline.preflight import check_stage_memory

    check_stage_memory(export_dir, "fuse", skip=no_memory_check)

    written = fuse_export(export_dir, list(variants) or None, progress=sys.stderr.isatty())
    click.echo(f"fused {export_dir}: " + ", ".join(written) + " (each judged against PyTorch)")


@main.command()
@click.argument("export_dir", metavar="EXPORT", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=Path("benchmarks/RESULTS.md"), show_default=True)
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--tokens", type=click.IntRange(min=8), default=128, show_default=True, help="Decode tokens per round.")
@click.option("--threads", type=click.IntRange(min=0), default=0, help="Intra-op threads for every engine [all cores].")
@click.option("--batch", "batches", type=int, multiple=True, help="Batch sizes [1 and 16].")
@click.option("--engines", default=None, help="Comma-separated subset (torch, optimum, genai, onnxgen).")
@click.option("--prefill", type=click.IntRange(min=1), default=256, show_default=True,
              help="Prompt tokens of the timed prefill (at most the context less one).")
def bench(export_dir, out, rounds, tokens, threads, batches, engines, prefill):
    """Decode tok/s, prefill time, peak RSS: onnxgen's variants against PyTorch, Optimum, genai."""
    from pipeline.check.bench import bench as run_bench

    run_bench(export_dir, out, rounds=rounds, tokens=tokens, threads=threads, batches=list(batches) or [1, 16],
              engines=[e.strip() for e in engines.split(",") if e.strip()] if engines else None, prefill=prefill)
    click.echo(f"wrote {out}")


@main.command("to-hf")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True)
def to_hf(checkpoint, out):
    """Write a trained run as a transformers GPT2LMHeadModel folder (safetensors + tokenizer)."""
    from pipeline.train.to_hf import save_run

    save_run(checkpoint, out)
    click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()
