"""The kernels' configs, each table beside the rule that reads it, with the measurements it
came from (notebooks 07, 09 and 10).

What ``moe_matmul`` and ``moe_experts`` run when given no config: the flat kernel's token block
from the routing (``flat_token_block``), a config tuned for this card and shape if one was saved
(notebook 09), else the hand-picked tables; the per-pair kernel for a few pairs outside CUDA
graph capture (``choose_implementation``, ``layer_path``).
"""

from __future__ import annotations

import ast
import functools
import json
from pathlib import Path

import helion
import torch

from .mode import DEVICE, ON_GPU

__all__ = [
    "ACTIVATION_BACKWARD_CONFIG",
    "COMBINE_CONFIG",
    "DEFAULT_CONFIGS",
    "FLAT_CONFIGS",
    "GATE_UP_CONFIGS",
    "HELION_DEFAULT_CONFIG",
    "LAYER_PER_PAIR_MAX_BYTES",
    "LAYER_PER_PAIR_MAX_PAIRS",
    "PER_PAIR_CONFIGS",
    "PER_PAIR_EXPERTS_PER_PAIR",
    "PER_PAIR_MAX_PAIRS",
    "RESULTS_DIR",
    "RUN_PADDING_MIN_EXPERT_BYTES",
    "TUNED_CONFIGS_PATH",
    "WEIGHT_GRAD_CONFIGS",
    "capturing_cuda_graph",
    "check_config",
    "choose_implementation",
    "configs_as_text",
    "configs_from_text",
    "default_config",
    "flat_half_tails",
    "flat_layer_configs",
    "flat_run_blocks",
    "flat_token_block",
    "fp8_configs",
    "layer_configs",
    "layer_pairs_are_few",
    "layer_path",
    "load_tuned_configs",
    "per_pair_max_pairs",
    "save_tuned_config",
    "split_token_block",
    "this_card",
    "tuned_config_key",
]


def check_config(config: helion.Config) -> None:
    """Raise a clear error naming ``config`` unless it is a Helion config whose
    ``block_sizes`` are three tiles, of [tokens, N, K], each a power of two (Helion's tiles are).

    Taught in notebook 09.
    """
    if not isinstance(config, helion.Config):
        raise TypeError(
            f"config must be a helion.Config (or None), got {type(config).__name__}; e.g. "
            "helion.Config(block_sizes=[128, 256, 64], num_warps=8, num_stages=3)"
        )
    block_sizes = config.config.get("block_sizes")
    if (
        not isinstance(block_sizes, list | tuple)
        or len(block_sizes) != 3
        or not all(
            type(size) is int and size > 0 and size & (size - 1) == 0 for size in block_sizes
        )
    ):
        raise ValueError(
            "config's block_sizes must be three tiles [tokens, N, K], each a power of two, "
            f"got {block_sizes!r}"
        )


def configs_as_text(configs: tuple[helion.Config, ...] | None) -> str | None:
    """Configs as the text a custom op takes (an op's arguments are tensors, numbers and
    strings): a Python literal, a list of each config's settings as a dict; None stays None.
    Written from the settings' ``repr``, which torch.compile traces (it cannot trace
    ``json.dumps``), so a compiled call with explicit configs has no graph break.
    ``configs_from_text`` reads it back.

    Taught in notebook 10.
    """
    if configs is None:
        return None
    settings = (
        ", ".join(f"{key!r}: {value!r}" for key, value in config.config.items())
        for config in configs
    )
    return "[" + ", ".join("{" + text + "}" for text in settings) + "]"


def configs_from_text(text: str | None) -> tuple[helion.Config, ...] | None:
    """The configs that ``configs_as_text`` wrote.

    Taught in notebook 10.
    """
    return None if text is None else tuple(map(helion.Config.from_dict, ast.literal_eval(text)))


def split_token_block(
    config: helion.Config, implementation: str = "flat"
) -> tuple[int, helion.Config]:
    """Split a config for ``moe_matmul`` into the token block and the kernel's config.

    Every implementation takes ``block_sizes`` as the tiles of [tokens, N, K]. The flat kernel
    gets its token block from the aligned routing instead, so the first entry goes to
    ``align_to_blocks`` and the rest (N and K tiles, warps, stages...) to the kernel; the
    per-pair kernel's token block is one pair.

    Taught in notebook 07.
    """
    block_t, *block_n_k = config["block_sizes"]
    if implementation == "per_pair":
        if block_t != 1:
            raise ValueError(
                "implementation 'per_pair' runs one pair per program: config's token block "
                f"(block_sizes[0]) must be 1, got {block_t}"
            )
    elif block_t < 16 or block_t & (block_t - 1):
        raise ValueError(
            f"config's token block (block_sizes[0]) must be a power of two >= 16, got {block_t}"
        )
    return block_t, helion.Config(**{**config.config, "block_sizes": block_n_k})


# The combine's [tokens, N] tiles (sum_pair_rows): a pass over memory, so wide N tiles.
COMBINE_CONFIG = helion.Config(block_sizes=[16, 256], num_warps=4, num_stages=1)


# block_sizes are the tiles of [tokens, N, K]. Helion's own default for these kernels, what
# it runs untuned: 16x16x16 tiles, 4 warps, no software pipelining.
HELION_DEFAULT_CONFIG = helion.Config(block_sizes=[16, 16, 16], num_warps=4, num_stages=1)


# What moe_matmul runs when given no config, per input dtype: the fastest of ten hand-picked
# configs of the masked-store kernel, measured on an H200 in bf16 at the two prefill shapes of
# notebook 05. float32 tiles take twice the shared memory, so float32 gets a 128-wide N tile.
# Large tiles also suit the interpreter, whose cost is per tile operation, not per element.
DEFAULT_CONFIGS = {
    torch.bfloat16: helion.Config(block_sizes=[128, 256, 64], num_warps=8, num_stages=3),
    torch.float16: helion.Config(block_sizes=[128, 256, 64], num_warps=8, num_stages=3),
    torch.float32: helion.Config(block_sizes=[128, 128, 64], num_warps=8, num_stages=3),
}


# The flat kernel's configs, per input dtype and token block, with block_sizes = [token block,
# N tile, K tile]. ``flat_token_block`` picks the block from the routing, and the block the
# tiles. Measured on an H200 in bf16 (notebooks/results/config_sweep.csv, kernel alone): 13
# configs at Mixtral-8x7B's two expert GEMMs from 8 to 16384 tokens and at DeepSeek-V3's gate_up
# from 8 to 512 tokens (the sweep ran out of time there). The 16-, 32- and 128-row entries were the
# fastest or within 2% of it wherever their block was the best one; the 64-row entry was the
# best 64-row config everywhere, though no size timed had 64 as its best block. 16 rows is the
# smallest block a tensor-core dot takes; 128 rows with 256-wide N tiles reached 611-631
# TFLOP/s at Mixtral-8x7B prefill. float32 tiles take twice the shared memory, so they are
# narrower (not timed). The 64- and 128-row entries launch their programs in L2 groups of 4
# token blocks (``l2_groupings``: the programs of four blocks walk the N tiles together, so
# those blocks' rows of A can stay in L2 from one N tile to the next). On an H100, the layer so
# grouped (with the gate_up entries below) beat the ungrouped order at 13 of the layer table's
# 14 prefill points in one run and 12 in another (notebook 17).
FLAT_CONFIGS = {
    dtype: {
        16: helion.Config(block_sizes=[16, 128, 256], num_warps=4, num_stages=3),
        32: helion.Config(block_sizes=[32, 128, 128], num_warps=4, num_stages=3),
        64: helion.Config(block_sizes=[64, 256, 64], l2_groupings=[4], num_warps=8, num_stages=3),
        128: helion.Config(block_sizes=[128, 256, 64], l2_groupings=[4], num_warps=8, num_stages=3),
    }
    for dtype in (torch.bfloat16, torch.float16)
}


FLAT_CONFIGS[torch.float32] = {
    16: helion.Config(block_sizes=[16, 64, 128], num_warps=4, num_stages=3),
    32: helion.Config(block_sizes=[32, 64, 128], num_warps=4, num_stages=3),
    64: helion.Config(block_sizes=[64, 64, 64], num_warps=4, num_stages=3),
    128: helion.Config(block_sizes=[128, 128, 64], num_warps=8, num_stages=3),
}


# e4m3 weights and activations (notebook 13), keyed by torch.float8_e4m3fn: each K step of the
# FP8 kernels multiplies its dot by the scale of one 128 x 128 block of W, so their K and N
# tiles are 128 (an e4m3 tile of 128 columns holds the bytes of a bf16 tile of 64), and the
# fused gate_up kernel quantizes the 128 columns of one activation scale group per program
# (``GATE_UP_CONFIGS``). Otherwise the bf16 tiles, and their L2 groups of 4 token blocks at 64
# and 128 rows: on an H200 the FP8 layer so grouped took 0.65-0.96x the ungrouped order's time
# at DeepSeek-V3, Kimi-K2 and Qwen3-235B-A22B with 4096 and 16384 tokens (128-row blocks at all
# six; probes/fp8_probe.py layer). At 128 rows the gate_up kernel loads W's tiles through
# tensor descriptors (TMA), the down kernel through pointers: on an H100 the layer so took 0.80x
# the time of pointer loads in both at Qwen3-235B-A22B, 0.99-1.05x at DeepSeek-V3 and Kimi-K2
# (4096 and 16384 tokens); descriptors in the down kernel cost up to 10% (probes/fp8_probe.py
# tma).
FLAT_CONFIGS[torch.float8_e4m3fn] = {
    16: helion.Config(block_sizes=[16, 128, 128], num_warps=4, num_stages=4),
    32: helion.Config(block_sizes=[32, 128, 128], num_warps=4, num_stages=4),
    64: helion.Config(block_sizes=[64, 128, 128], l2_groupings=[4], num_warps=8, num_stages=3),
    128: helion.Config(block_sizes=[128, 128, 128], l2_groupings=[4], num_warps=8, num_stages=3),
}


# Taught in notebook 07, which prints this source.
def flat_token_block(num_pairs: int, num_experts: int) -> int:
    """The flat kernel's token block for a routing: twice the pairs an expert gets on average,
    as a power of two from 16 to 128.

    Each block of an expert reads all of its weights, so while the weights are what takes the
    time (few pairs per expert) a block should hold an expert's whole share, which varies
    around the average: with twice the average, most experts fill one block and their weights
    are read once (at DeepSeek-V3, T = 512, 16 pairs per expert, the 16-row entry of
    ``FLAT_CONFIGS`` took 1.08-1.20x the 32-row entry's time, notebooks/results/config_sweep.csv).
    At 128 pairs per expert and more (the sweep's larger points), the GEMM is bound by
    arithmetic and 128-row tiles are the fastest; the rule takes them from 64 pairs per expert
    on, where twice the average reaches 128.
    """
    average = -(-num_pairs // num_experts)
    return min(128, max(16, helion.next_power_of_2(2 * average)))


def flat_half_tails(block_t: int) -> bool:
    """Whether the layer's flat kernels (its forward's two, the backward's dA GEMM) run an
    expert's last block at half height when its second half holds no pair (their
    ``half_tails`` flag): with 128-row blocks.

    An expert's last block holds 1 to ``block_t`` of its pairs; a tile half as tall does the
    same work for 1 to ``block_t / 2`` of them at half the cost. On an H100, through
    ``moe_experts`` at seven models' sizes and 4096, 8192 and 16384 tokens (notebook 17), the
    layer with half tails was ahead of or level with the layer without at every point that
    ran 128-row blocks but gpt-oss-120b's, by up to 1.33x where half the blocks were such
    tails. With interleaved [E, K, 2I] weights (gpt-oss) the fused gate_up kernel reads gate
    and up as one slab and runs every block whole: a half branch there read alternate columns
    and took the layer 1.4-2.3x the time; the down kernel keeps its half tails. 64-row blocks
    were timed at one point only, level. On the same H100 a training step (forward and
    backward) took 2-3% less time with half tails at Qwen3-30B-A3B (16384 tokens) and
    Qwen3-235B-A22B (8192; probes/backward_probe.py half_tails_step).

    Taught in notebook 17.
    """
    return block_t >= 128


# One expert's weights (its larger GEMM's), in bytes, from which each expert's run of token blocks
# is padded to whole L2 groups (``flat_run_blocks``): between the sizes where each layout led.
RUN_PADDING_MIN_EXPERT_BYTES = 10 * 2**20


def flat_run_blocks(W: torch.Tensor, *configs: helion.Config) -> int:
    """The blocks each expert's run of the routing is padded to a multiple of
    (``align_to_blocks``' ``run_blocks``): the largest L2 group of token blocks among the flat
    kernels' ``configs`` (1 without one), so that each expert's blocks start a group and no
    group of programs walking the N tiles together reads two experts' weights; but 1 where one
    expert's weights ``W[e]`` (W: the larger GEMM's [E, ...] weights) take fewer bytes than
    ``RUN_PADDING_MIN_EXPERT_BYTES``.

    Through ``moe_experts`` on an H100 (notebook 17), runs of whole groups of 4 led runs of
    single blocks by 0.08-0.12 of grouped_mm core's speed at DeepSeek-V3 (59 MB of gate_up
    weights per expert) and by 0.01-0.02 at Qwen3-235B-A22B (25 MB); single blocks led by
    0.06-0.07 at Qwen3-Next-80B-A3B (4 MB); at Qwen3-30B-A3B (6 MB) and gpt-oss-120b (33 MB)
    neither led at both 4096 and 16384 tokens. (Padding a small expert's few blocks to four
    adds programs that only exit; why that costs more than mixed groups save is not measured.)

    Taught in notebook 17.
    """
    if W[0].numel() * W.element_size() < RUN_PADDING_MIN_EXPERT_BYTES:
        return 1
    return max([1, *(config.l2_groupings[0] for config in configs if config.l2_groupings)])


# The course's GPU measurements, which the notebooks plot, and the configs found by autotuning
# (notebook 09), per card and problem, which moe_matmul reuses.
RESULTS_DIR = Path(__file__).parent.parent / "notebooks" / "results"
TUNED_CONFIGS_PATH = RESULTS_DIR / "tuned_configs.json"


def tuned_config_key(
    dtype: torch.dtype, num_pairs: int, K: int, N: int, E: int, card: str | None = None
) -> str:
    """Key of a tuned config: the card it was tuned on (this machine's when None) and the
    problem's sizes.

    Taught in notebook 09.
    """
    return f"{card or this_card()} | {dtype} | pairs={num_pairs} K={K} N={N} E={E}"


@functools.cache
def this_card() -> str:
    """The name of this machine's GPU ("cpu" without one), asked once.

    Taught in notebook 09.
    """
    return torch.cuda.get_device_name() if ON_GPU else "cpu"


def load_tuned_configs() -> dict[str, helion.Config]:
    """The saved tuned configs, by ``tuned_config_key`` (none if the file does not exist).

    ``moe_matmul`` asks on every call, so the file is parsed once per version of it.

    Taught in notebook 09.
    """
    if not TUNED_CONFIGS_PATH.exists():
        return {}
    return _read_tuned_configs(TUNED_CONFIGS_PATH, TUNED_CONFIGS_PATH.stat().st_mtime_ns)


@functools.cache
def _read_tuned_configs(path: Path, mtime_ns: int) -> dict[str, helion.Config]:
    saved = json.loads(path.read_text())
    return {key: helion.Config(**config) for key, config in saved.items()}


def save_tuned_config(key: str, config: helion.Config) -> None:
    """Add (or replace) one tuned config in ``TUNED_CONFIGS_PATH``.

    Taught in notebook 09.
    """
    saved = json.loads(TUNED_CONFIGS_PATH.read_text()) if TUNED_CONFIGS_PATH.exists() else {}
    saved[key] = dict(config)
    TUNED_CONFIGS_PATH.write_text(json.dumps(saved, indent=1, sort_keys=True) + "\n")


def default_config(
    implementation: str, dtype: torch.dtype, num_pairs: int, K: int, N: int, E: int
) -> helion.Config:
    """The config ``moe_matmul`` runs when given none.

    Per-expert kernels: ``DEFAULT_CONFIGS[dtype]``; per-pair kernel: ``PER_PAIR_CONFIGS[dtype]``.
    Flat kernel: a config tuned for this card and problem if one was saved (notebook 09), else
    ``FLAT_CONFIGS[dtype][flat_token_block(num_pairs, E)]``.

    Taught in notebook 07.
    """
    if implementation == "per_pair":
        return PER_PAIR_CONFIGS[dtype]
    if implementation != "flat":
        return DEFAULT_CONFIGS[dtype]
    tuned = load_tuned_configs().get(tuned_config_key(dtype, num_pairs, K, N, E))
    if tuned is not None:
        return tuned
    return FLAT_CONFIGS[dtype][flat_token_block(num_pairs, E)]


# The per-pair kernel's configs: block_sizes = [1 (one pair per program), N tile, K tile].
# Six tilings timed on an H200 in bf16, in CUDA graphs, at 1-8 tokens of the Mixtral-8x7B and
# DeepSeek-V3 gate_up GEMMs (NOTES.md): 64x128 with 8 warps was best or within 6% of the best
# at one token (134 and 158 us); at 4-8 tokens 32x128 with 4 warps was faster (by 12-26%).
# float32 takes the same tiles, untimed.
PER_PAIR_CONFIGS = {
    dtype: helion.Config(block_sizes=[1, 64, 128], num_warps=8, num_stages=4)
    for dtype in (torch.bfloat16, torch.float16, torch.float32)
}


# implementation="auto" runs the per-pair kernel, outside CUDA graphs, up to PER_PAIR_MAX_PAIRS
# pairs and up to one pair per PER_PAIR_EXPERTS_PER_PAIR experts. An eager call takes about the
# larger of its host time and its GPU time; on an H200 (NOTES.md, one run) the per-pair call
# with the tiles above took 312-525 us at 1-4 Mixtral-8x7B tokens (2-8 pairs on 8 experts)
# where the flat call took 440-699 us of host time; at 8 tokens the flat call won (494 against
# 848 us). At DeepSeek-V3's 256 experts the per-pair call won at 1 and 2 tokens (16 pairs:
# 398 against 431 us) and lost at 4 (492 against 456 us).
PER_PAIR_MAX_PAIRS = 8


PER_PAIR_EXPERTS_PER_PAIR = 16


def per_pair_max_pairs(num_experts: int) -> int:
    """Up to how many pairs ``implementation="auto"`` runs the per-pair kernel: while pairs
    rarely share an expert (at most one pair per ``PER_PAIR_EXPERTS_PER_PAIR`` experts), it
    reads each active expert's weights once, as the flat kernel does, in one launch instead of
    three; and always up to ``PER_PAIR_MAX_PAIRS``.

    Taught in notebook 07.
    """
    return max(PER_PAIR_MAX_PAIRS, num_experts // PER_PAIR_EXPERTS_PER_PAIR)


def capturing_cuda_graph() -> bool:
    """Whether a CUDA graph is being captured on the current stream. A graph launches
    everything for the cost of one launch, so the flat kernels' GPU speed counts there.

    Taught in notebook 07.
    """
    return ON_GPU and torch.cuda.is_current_stream_capturing()


# Taught in notebook 07, which prints this source.
def choose_implementation(
    num_pairs: int,
    num_experts: int,
    config: helion.Config | None,
) -> str:
    """What ``implementation="auto"`` runs when its kernels are launched one by one (an eager
    decode-sized call on a GPU replays the flat kernel instead: ``replays_eager_call``). With a
    config, its token block decides: 1 is the per-pair kernel, larger the flat one. Without:
    the per-pair kernel for at most ``per_pair_max_pairs(E)`` pairs, one launch where the
    host's launches set the pace, unless a CUDA graph is being captured; else the flat
    kernel."""
    if config is not None:
        return "per_pair" if config["block_sizes"][0] == 1 else "flat"
    few = num_pairs <= per_pair_max_pairs(num_experts)
    return "per_pair" if few and not capturing_cuda_graph() else "flat"


# The fused gate_up kernel's configs (``moe_gate_up_flat``), per dtype and token block, with
# block_sizes = [token block, N tile of I, K tile]. It keeps two accumulators and loads two weight
# tiles per K step, so 256-wide N tiles run out of shared memory; on an H200 in bf16 (kernel
# alone, transformers' [E, 2I, H] weights, 4-5 tilings per block at two or three model sizes
# each, NOTES.md) these were the fastest or within 1.3% of it. L2 groups of 4 token blocks at 64
# and 128 rows, as in ``FLAT_CONFIGS``.
GATE_UP_CONFIGS = {
    dtype: {
        16: helion.Config(block_sizes=[16, 128, 128], num_warps=4, num_stages=4),
        32: helion.Config(block_sizes=[32, 128, 128], num_warps=4, num_stages=3),
        64: helion.Config(block_sizes=[64, 128, 64], l2_groupings=[4], num_warps=4, num_stages=3),
        128: helion.Config(block_sizes=[128, 128, 64], l2_groupings=[4], num_warps=8, num_stages=4),
    }
    for dtype in (torch.bfloat16, torch.float16)
}


GATE_UP_CONFIGS[torch.float32] = {
    16: helion.Config(block_sizes=[16, 64, 128], num_warps=4, num_stages=3),
    32: helion.Config(block_sizes=[32, 64, 128], num_warps=4, num_stages=3),
    64: helion.Config(block_sizes=[64, 64, 64], num_warps=4, num_stages=3),
    128: helion.Config(block_sizes=[128, 64, 64], num_warps=8, num_stages=3),
}


GATE_UP_CONFIGS[torch.float8_e4m3fn] = {  # see FLAT_CONFIGS' e4m3 entry
    16: helion.Config(block_sizes=[16, 128, 128], num_warps=4, num_stages=4),
    32: helion.Config(block_sizes=[32, 128, 128], num_warps=4, num_stages=4),
    64: helion.Config(block_sizes=[64, 128, 128], l2_groupings=[4], num_warps=4, num_stages=3),
    128: helion.Config(
        block_sizes=[128, 128, 128],
        l2_groupings=[4],
        indexing="tensor_descriptor",
        num_warps=8,
        num_stages=3,
    ),
}


# The layer (moe_experts) runs its two per-pair kernels (``moe_experts_per_pair``) outside CUDA
# graph capture while its pairs are few and their expert weights small. Where it runs, the
# per-pair kernels read each pair's weights (a shared expert once per pair) at 1.2-3.7 TB/s on
# an H200, while the flat path spent a median 164 us more host time per call on its metadata
# and launches. In that run (results/layer_decode.csv: six models at 1-32 tokens, eager) the
# per-pair layer was the faster one wherever its pairs' weights (pairs x one expert's gate_up
# and down) came to at most 1 GiB, except gpt-oss-120b's 16 pairs (0.80x), and the flat one
# wherever they came to more, except three points of 32-256 pairs of small experts (Qwen3
# models, where per pair was 1.2-2.0x faster). On the CPU the interpreter's time grows with the
# programs instead: 64 pairs per pair took 3.4x the flat layer's time there, 16 pairs 1.06x.
LAYER_PER_PAIR_MAX_BYTES = 2**30


LAYER_PER_PAIR_MAX_PAIRS = {"cuda": 64, "cpu": 16}  # by the device's type


def layer_pairs_are_few(num_pairs: int, expert_bytes: int, device_type: str = DEVICE.type) -> bool:
    """The layer's per-pair bound: at most ``LAYER_PER_PAIR_MAX_PAIRS[device_type]`` pairs whose
    expert weights (``expert_bytes`` each, gate_up and down) come to at most
    ``LAYER_PER_PAIR_MAX_BYTES``, counting a shared expert once per pair as the per-pair
    kernels read it.

    Taught in notebook 15.
    """
    few = num_pairs <= LAYER_PER_PAIR_MAX_PAIRS[device_type]
    return few and num_pairs * expert_bytes <= LAYER_PER_PAIR_MAX_BYTES


def layer_path(
    num_pairs: int,
    W_gate_up: torch.Tensor,  # [E, K, 2I]
    W_down: torch.Tensor,  # [E, I, N]
) -> str:
    """What ``moe_experts`` runs without configs: "per_pair" (``moe_experts_per_pair``) outside
    CUDA graph capture while ``layer_pairs_are_few`` on this machine; else "flat".

    Taught in notebook 10.
    """
    expert_bytes = (W_gate_up[0].numel() + W_down[0].numel()) * W_gate_up.element_size()
    few = layer_pairs_are_few(num_pairs, expert_bytes)
    return "per_pair" if few and not capturing_cuda_graph() else "flat"


def flat_layer_configs(
    dtype: torch.dtype, num_pairs: int, num_experts: int
) -> tuple[helion.Config, helion.Config]:
    """The flat rule's (gate_up, down) configs of ``moe_experts``: the token block
    ``flat_token_block`` picks, and ``GATE_UP_CONFIGS`` and ``FLAT_CONFIGS`` for it.

    Taught in notebook 10.
    """
    block_t = flat_token_block(num_pairs, num_experts)
    return GATE_UP_CONFIGS[dtype][block_t], FLAT_CONFIGS[dtype][block_t]


def layer_configs(
    configs: tuple[helion.Config, helion.Config] | None,
    dtype: torch.dtype,
    num_pairs: int,
    num_experts: int,
) -> tuple[int, helion.Config, helion.Config]:
    """The token block and the two kernels' configs of ``moe_experts``: from ``configs``, a
    (gate_up, down) pair of [tokens, N, K] configs with one token block (1 for the per-pair
    kernels), or by the flat rule (``flat_layer_configs``).

    Taught in notebook 10.
    """
    if configs is None:
        configs = flat_layer_configs(dtype, num_pairs, num_experts)
    if not isinstance(configs, tuple | list) or len(configs) != 2:
        raise TypeError(
            f"configs must be None or a (gate_up, down) pair of helion.Config, got {configs!r}"
        )
    for config in configs:  # the TypeError before a non-config is hashed as a cache key
        if not isinstance(config, helion.Config):
            check_config(config)
    # torch.compile traces the function itself (and warns about a cache it would skip)
    compiling = torch.compiler.is_compiling()
    split = _split_layer_configs.__wrapped__ if compiling else _split_layer_configs
    return split(tuple(configs))


@functools.lru_cache(maxsize=256)
def _split_layer_configs(
    configs: tuple[helion.Config, helion.Config],
) -> tuple[int, helion.Config, helion.Config]:
    """``layer_configs``' checks and split, once per pair of configs (a config hashes by its
    value): every eager call of the layer asks for the same few pairs."""
    for config in configs:
        check_config(config)
    (block_t, gate_up), (down_block_t, down) = (
        split_token_block(c, "per_pair" if c["block_sizes"][0] == 1 else "flat") for c in configs
    )
    if block_t != down_block_t:
        raise ValueError(
            "configs must share their token block (block_sizes[0]): both GEMMs read one "
            f"routing, got {block_t} and {down_block_t}"
        )
    return block_t, gate_up, down


def fp8_configs(
    configs: tuple[helion.Config, ...] | None,
    num_pairs: int,
    num_experts: int,
) -> tuple[int, helion.Config, helion.Config]:
    """The token block and the two kernel configs of the FP8 layer (``moe_experts_fp8``), as
    ``layer_configs`` gives them for e4m3 (the ``torch.float8_e4m3fn`` tables); for
    ``moe_matmul_fp8``, ``configs`` is its one config, returned twice. A clear error naming
    ``configs`` unless the token block is at least 16 (the FP8 path has no per-pair kernels),
    each K and N tile divides 128 (one block of W's scales per K step of a tile) and the
    gate_up N tile is 128 (one activation scale group per program).

    Taught in notebook 13.
    """
    single = isinstance(configs, tuple | list) and len(configs) == 1
    if single:
        configs = (configs[0], configs[0])
    block_t, gate_up, down = layer_configs(configs, torch.float8_e4m3fn, num_pairs, num_experts)
    (gate_up_n, gate_up_k), (down_n, down_k) = gate_up["block_sizes"], down["block_sizes"]
    if block_t == 1:
        raise ValueError("configs' token block must be a power of two >= 16: FP8 runs flat kernels")
    if 128 % gate_up_k or 128 % down_k:
        raise ValueError(
            f"configs' K tiles (block_sizes[2]) must divide 128, one scale block per K step; "
            f"got {gate_up_k} and {down_k}"
        )
    if 128 % gate_up_n or 128 % down_n:
        raise ValueError(
            f"configs' N tiles (block_sizes[1]) must divide 128, one scale block per tile; "
            f"got {gate_up_n} and {down_n}"
        )
    if not single and gate_up_n != 128:
        raise ValueError(
            f"the gate_up config's N tile (block_sizes[1]) must be 128, the activation's scale "
            f"group, got {gate_up_n}"
        )
    return block_t, gate_up, down


# The gated activation's backward (``gated_activation_backward``), an elementwise pass:
# block_sizes = [I tile, pair rows] (the kernel registers its I tile first). 512 columns by 8
# rows, 4 warps: of 12 configs (11 tilings) timed alone on an H100 at four training points
# (notebook 15, results/activation_backward_sweep.json), the least time in total (level with
# [512, 16] and 8 warps), moving the pass's six bf16 [P, I] tensors at 0.89-0.95 of the copy
# rate. 16 columns by 256 rows, the same elements per program in 32-byte pieces of each row,
# took 0.20-0.54 of it there.
ACTIVATION_BACKWARD_CONFIG = helion.Config(block_sizes=[512, 8], num_warps=4, num_stages=1)


# The weight-gradient kernel's configs (``moe_weight_grad``): block_sizes = [K tile, N tile].
# For 16-bit types, the least total time of eight configs on an H200 in bf16 over both of the
# layer's weight gradients (both unweighted, as the layer runs them) at Mixtral-8x7B and
# DeepSeek-V3 (8192 tokens) and Qwen3-30B-A3B (16384), kernel alone
# (results/weight_grad_sweep.json): 36.6 ms in all, against 39.7 for 256 x 128 tiles and 48.5
# for 128 x 128; fastest or within 3% of the fastest at every point. float32 tiles take twice
# the shared memory (not timed).
WEIGHT_GRAD_CONFIGS = {
    torch.bfloat16: helion.Config(block_sizes=[128, 256], num_warps=8, num_stages=2),
    torch.float16: helion.Config(block_sizes=[128, 256], num_warps=8, num_stages=2),
    torch.float32: helion.Config(block_sizes=[64, 64], num_warps=4, num_stages=3),
}
