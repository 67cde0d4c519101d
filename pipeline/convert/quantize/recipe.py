"""What to do: the recipe of each quantized variant, its presets and its checks, and the choices the CLI offers.
No onnx here: `onnxgen`'s start-up imports the choices from this module."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from pipeline import manifest
from pipeline.errors import UserError

QUANTIZED = ("int8", "int4", "fp16")
INT8_MODES = ("dynamic", "static", "blockwise")
DEFAULT_INT8_MODE = "blockwise"
HEADS = ("int4", "int8", "fp32")   # the int4 variant's LM head precision
METHODS = ("rtn", "hqq", "gptq")
SCALES = ("fp16", "fp32")
BLOCKS = (16, 32, 64, 128, 256)
ACCURACY_LEVELS = (0, 1, 4)

KINDS = {  # our decoder's weight MatMuls (model/decoder.py names them GPT-2's way, whatever the family)
    "qkv": "attn/c_attn", "o": "attn/c_proj", "gate_up": "mlp/c_fc", "up": "mlp/c_fc", "down": "mlp/c_proj"}


@dataclass(frozen=True)
class Recipe:
    """How the weight MatMuls of a variant are quantized (recorded in the manifest as .summary()).

    bits          the body's bits (4 or 8)
    method        rtn: round to nearest (onnxruntime's MLAS quantizer); hqq: onnxruntime's HQQ (fp32 zero
                  points, asymmetric); gptq: error-compensating, needs calibration windows (`gptq_quantize`)
    block_size    weights per scale along the input axis (32, 64, 128)
    symmetric     rtn only: no zero points (hqq is always asymmetric, gptq follows this flag)
    accuracy_level  MatMulNBits' compute type on CPU: 4 = int8 activations per block, 0 = fp32
    head          the LM head's (and, tied, the embedding's) precision: int4, int8, fp32; always symmetric
                  (the embedding lookup reads a tied head's table, without zero points). Round to nearest,
                  except a 4-bit head under method gptq, which GPTQ solves too: on SmolLM2 (tied, block 64,
                  act order, q/k/v and first/last 8-bit) KLD 0.237 with an RTN 4-bit head, 0.084 with GPTQ's,
                  both 88.8 MB (benchmarks/QUANT.md). The embedding then reads the head's solution, which
                  serves the logits first; the measured KLD is that of the whole graph, lookup included
    eight_bit     body tensors that get 8 bits: "first_last" (first and last blocks), "block:0,29",
                  a kind ("qkv", "o", "gate_up", "down") optionally with layers ("down:0-3,27", "down:outer":
                  the first and last sixth of the blocks)
    fp32_compute  tensors (same selectors, and "head") run at accuracy_level 0 whatever accuracy_level says
    head_block    the head's (and tied embedding's) block size; 0: block_size. An 8-bit head is 8 bits of
                  code and, at block 32, 1 bit of fp32 scale a weight: block 128 takes that to 0.25
    act_order     gptq only: rows by decreasing Hessian diagonal, with static groups (gptq_weight)
    grid_search   gptq only: each block's range shrunk to the one that rounds it with the least
                  Hessian-weighted error (_grid), instead of the full min/max range
    scales        how the file stores the scales: "fp16" (an fp16 initializer and a Cast to the fp32 that
                  MatMulNBits takes in an fp32 graph, which onnxruntime folds when it loads the session:
                  store_scales_fp16) or "fp32". At block 32 an fp32 scale costs 1 bit a weight, fp16 0.5
                  (llama.cpp's blocks store fp16 scales too): SmolLM2's int4 94.9 -> 86.5 MB, same speed
    """
    bits: int = 4
    method: str = "rtn"
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 4
    head: str = "int8"
    eight_bit: tuple[str, ...] = ("first_last",)
    fp32_compute: tuple[str, ...] = ()
    head_block: int = 0
    act_order: bool = False
    grid_search: bool = False
    scales: str = "fp16"

    def __post_init__(self):
        """Every recipe is checked here, once, however it was made (defaults, presets, the CLI's options)."""
        checks = [(self.method in METHODS, f"--method {self.method}: expected one of {', '.join(METHODS)}"),
                  (self.block_size in BLOCKS,
                   f"--block-size {self.block_size}: expected a power of two from 16 to 256"),
                  (self.scales in SCALES, f"--scales {self.scales}: expected one of {', '.join(SCALES)}"),
                  (self.head_block in (0, *BLOCKS),
                   f"--head-block-size {self.head_block}: expected a power of two from 16 to 256"),
                  (self.head in HEADS, f"--head {self.head}: expected one of {', '.join(HEADS)}"),
                  (self.accuracy_level in ACCURACY_LEVELS,
                   f"--accuracy-level {self.accuracy_level}: expected one of {', '.join(map(str, ACCURACY_LEVELS))}"),
                  (self.bits in (4, 8), f"bits {self.bits}: expected 4 or 8")]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    @property
    def head_block_size(self) -> int:
        return self.head_block or self.block_size

    @property
    def gptq_head(self) -> bool:
        return self.method == "gptq" and self.head == "int4"

    def summary(self) -> dict:
        return {"method": self.method, "bits": self.bits, "block_size": self.block_size,
                "symmetric": self.symmetric if self.method != "hqq" else False,
                "accuracy_level": self.accuracy_level, "lm_head": self.head, "lm_head_block": self.head_block_size,
                **({"lm_head_method": "gptq"} if self.gptq_head else {}),
                "eight_bit": list(self.eight_bit),
                **({"act_order": True} if self.act_order and self.method == "gptq" else {}),
                **({"grid_search": True} if self.grid_search and self.method == "gptq" else {}),
                "scales": self.scales,
                **({"fp32_compute": list(self.fp32_compute)} if self.fp32_compute else {})}


# The default recipe per variant: for models trained here ("trained", set on tiny and small, whose
# thresholds they pass) and for imports ("import", set on SmolLM2-135M-Instruct by
# benchmarks/quant_quality.py, see benchmarks/QUANT.md).
#   import int8: block 16: the kernel's int8 activations come in blocks of 16 as well; SmolLM2 KLD 2.7e-3
#     against block 32's 4.4e-3 (dithered: 3.05e-3 against 5.1e-3), same decode speed, 169 MB against 152
#     with fp32 scales (accuracy_level 0 gives 1.4e-3 but decodes 6x slower); 152 MB and 2.76e-3 with fp16.
#   import int4: GPTQ with zero points, in act order, searched grids, block 32, calibrated on the export's
#     corpus; fp16 scales. 8 bits for every q/k/v projection, the first and last blocks and the down
#     projections of the outer blocks (the first and last sixth: SmolLM2's 0-4 and 25-29): per MB the most
#     sensitive tensors (on the dithered SmolLM2, the rest round-to-nearest 4-bit, 8 bits cut KLD by 0.019
#     a MB for q/k/v, 0.021 first/last blocks, 0.008 down, 0.004 gate/up, 0.003 o). The head (and the tied
#     embedding, which reads its table) 4-bit, solved by GPTQ too, at block 16. On SmolLM2-135M-Instruct,
#     8,192 scored tokens of English text (benchmarks/QUANT.md), calibrated on other English text: 94.6 MB,
#     KLD 0.049, same top-1 88.2%, PPL ratio 1.048 on the dithered stand-in (converted: 0.041 / 88.8% /
#     1.026); calibrated on the default corpus (Python source) 0.051 / 87.4% / 1.055 on the converted model.
#     The previous default (8-bit head, fp32 scales) was 0.039 / 89.4% / 1.038 at 111.9 MB. The head's
#     block 16 costs ~10% of decode speed against 32 (benchmarks/REAL_MODEL.md). Costs a calibration pass
#     (~4 min for SmolLM2 on 2 cores).
DEFAULT_RECIPES = {
    "trained": {"int8": Recipe(bits=8, eight_bit=()), "int4": Recipe()},
    "import": {"int8": Recipe(bits=8, eight_bit=(), block_size=16),
               "int4": Recipe(method="gptq", symmetric=False, act_order=True, grid_search=True, head="int4",
                              head_block=16, eight_bit=("first_last", "qkv", "down:outer"))},
}


# The "fast" int4 recipe (`quantize --recipe fast`): the default's method, every tensor 4-bit at block 64, the head
# (and the tied embedding that reads its table) included. For speed: a batch-1 decode step reads every weight
# once, and MLAS's 4-bit kernel is faster per weight at block 64 than at 32 (fewer blocks to scale and sum)
# while the default's 8-bit tensors and block-16 head cost more per weight than they save in error. On
# SmolLM2-135M-Instruct (benchmarks/REAL_MODEL.md, QUANT.md): 73.5 MB, KLD 0.096, same top-1 83.5%, PPL ratio
# 1.074 (the default: 94.6 MB, 0.041 / 88.8% / 1.026; onnxruntime-genai's builder int4: 86 MB, 0.439 / 63.2% /
# 1.372), decoding 1.3-1.5x the default's speed (three side-by-side runs, 1 and 2 threads). Block 128 is
# faster still but pads SmolLM2's 576-long rows to 640 (77.2 MB) and loses more (KLD 0.126).
FAST_INT4 = {"block_size": 64, "head": "int4", "head_block": 64, "eight_bit": ()}

RECIPE_PRESETS = ("default", "fast")


def recipe_for(folder: Path, variant: str, preset: str = "default", **overrides) -> Recipe:
    """The default recipe of `variant` for this export (an import's or a trained model's), made the fast one
    (FAST_INT4, int4 only) when `preset` is "fast", with the options given (not None) replacing its fields."""
    if preset not in RECIPE_PRESETS:
        raise UserError(f"--recipe {preset}: expected one of {', '.join(RECIPE_PRESETS)}")
    base = DEFAULT_RECIPES["import" if manifest.is_import(folder) else "trained"][variant]
    if preset == "fast" and variant == "int4":
        base = replace(base, **FAST_INT4)
    given = {k: v for k, v in overrides.items() if v is not None}
    if "eight_bit" in given:
        given["eight_bit"] = tuple(x for x in given["eight_bit"] if x and x != "none")
    if base.bits == 8:  # 8-bit tensors are always round to nearest (symmetric): --method and --head are int4's
        given.update(method="rtn", symmetric=True)
        given.pop("head", None)
    return replace(base, **given)
