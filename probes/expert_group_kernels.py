"""The layers' flat kernels (bf16 and FP8) with each expert's blocks as one L2 group, for
``prefill_probe.py expert_groups`` and ``fp8_probe.py prefill_expert_groups``.

The package's kernels launch one program per (token block, N tile) and group the programs of 4
consecutive blocks (``l2_groupings``) so that they walk the N tiles together; the routing pads
each large expert's run of blocks to whole groups (``mh.flat_run_blocks``), so that no group
holds two experts. Here the group is the expert's own run, however many blocks it has, and
nothing is padded: program p finds its block q = p // n_tiles, the run around it (its first
block s and its length c, from the tables ``expert_group_tables`` builds), and takes block
s + (p - s n_tiles) % c and N tile (p - s n_tiles) // c. So each expert's c blocks take
programs s n_tiles to (s + c) n_tiles - 1, walking the N tiles together, c at a time.

The kernels are built from the package's source (helion_moe/kernels/flat.py and fp8.py), not
copied: the outer ``hl.tile`` over [blocks, N] becomes that mapping, the N tile a compile-time
argument ``block_n`` (the config's ``block_sizes`` are then the K tile only), and everything else
is the package's code. Each generated module is written to a temporary file, since Helion reads a
kernel's source.
"""

import helion_moe.kernels.flat as flat
import helion_moe.kernels.fp8 as fp8
from helion_moe.launch import run_kernel

import contextlib
import functools
import importlib.util
import inspect
import re
import sys
import tempfile
from pathlib import Path
from unittest import mock

import helion
import torch

MAPPING = """\
    n_tiles = ({n} + block_n - 1) // block_n
    for p in hl.grid(num_blocks * n_tiles):
        run_first = run_start[p // n_tiles]
        blocks = run_len[p // n_tiles]
        local = p - run_first * n_tiles
        group_b = run_first + local % blocks
        n0 = local // blocks * block_n
        n1 = torch.where(n0 + block_n < {n}, n0 + block_n, {n})  # the last tile may be short
        for tile_n in hl.tile(n0, n1, block_size=block_n):
"""


def grouped_source(source: str) -> str:
    """A kernel file's source with its flat kernels rewritten as the module docstring says."""
    lines, out, body = source.splitlines(keepends=True), [], False
    for line in lines:
        if line.startswith("from ..launch"):
            line = "from helion_moe.launch import sizes_of_one\n"
        elif line.startswith("from .activations"):
            line = line.replace("from .activations", "from helion_moe.kernels.activations")
        elif line.startswith("def moe_"):
            line = line.replace("(", "_expert_groups(")
        elif "block_expert_ids: torch.Tensor," in line and line.startswith("    "):
            line += "    run_start: torch.Tensor,  # [num_blocks] int32 first block of the run\n"
            line += "    run_len: torch.Tensor,  # [num_blocks] int32 blocks in the run\n"
        elif line.startswith("    half_tails: hl.constexpr = False"):
            line += "    block_n: hl.constexpr = 128,  # the N tile\n"
        elif re.match(r"    block_n = hl.register_block_size\((\w+)\)", line):
            continue
        elif match := re.match(r"    for tile_b, tile_n in hl.tile\(\[num_blocks, (\w+)\]", line):
            out.append(MAPPING.format(n=match[1]))
            body = True
            continue
        elif line.startswith("    return"):
            body = False
        if body and line.strip():
            line = "    " + line.replace("tile_b.begin", "group_b")
        out.append(line)
    return "".join(out)


def _load(module):
    name = module.__name__.rsplit(".", 1)[1] + "_expert_groups"
    path = Path(tempfile.mkdtemp()) / f"{name}.py"
    path.write_text(grouped_source(inspect.getsource(module)))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # Helion finds a kernel's globals through its module
    spec.loader.exec_module(module)
    return module


_generated = {module: _load(module) for module in (flat, fp8)}
GROUPED_KERNELS = {  # each of the package's flat kernels: its expert-grouped form
    getattr(module, name): getattr(_generated[module], f"{name}_expert_groups")
    for module, names in (
        (flat, ("moe_matmul_flat", "moe_gate_up_flat")),
        (fp8, ("moe_matmul_flat_fp8", "moe_gate_up_flat_fp8")),
    )
    for name in names
}


def expert_group_tables(
    block_expert_ids: torch.Tensor,  # [num_blocks] int32, E = unused block (all at the end)
    num_experts: int,
    most_blocks: int | None = None,  # split longer runs into groups of at most this many
) -> tuple[torch.Tensor, torch.Tensor]:  # run_start, run_len: [num_blocks] int32
    """For each block, the first block of its group and the group's length, from a routing of
    single-block runs (``align_to_blocks`` with ``run_blocks=1``: an expert's blocks are
    consecutive, experts in order): the expert's whole run, or with ``most_blocks`` its run cut
    into groups of that many blocks (the last shorter). An unused block is a group of one."""
    blocks = block_expert_ids.long()
    counts = torch.bincount(blocks, minlength=num_experts + 1)
    starts = torch.cumsum(counts, 0) - counts
    used = blocks < num_experts
    index = torch.arange(blocks.numel(), device=blocks.device)
    run_start, run_len = starts[blocks], counts[blocks]
    if most_blocks is not None:
        first = run_start + (index - run_start) // most_blocks * most_blocks
        run_start, run_len = first, torch.clamp(run_start + run_len - first, max=most_blocks)
    run_start = torch.where(used, run_start, index)
    run_len = torch.where(used, run_len, 1)
    return run_start.to(torch.int32), run_len.to(torch.int32)


def expert_group_config(config: helion.Config) -> tuple[helion.Config, int]:
    """A package config of [N, K] tiles as the grouped kernels take it: block_sizes [K] and
    the N tile apart, with no ``l2_groupings`` (the grid is one-dimensional)."""
    block_n, block_k = config.config["block_sizes"]
    settings = {k: v for k, v in config.config.items() if k not in ("block_sizes", "l2_groupings")}
    return helion.Config(block_sizes=[block_k], **settings), block_n


def run_kernel_expert_groups(kernel, args, config, *index_dtype, most_blocks=None):
    """``mh.run_kernel`` that runs the package's flat kernels in their expert-grouped forms, in
    groups of at most ``most_blocks`` blocks (None: whole runs): the run tables go after the
    routing's ``block_expert_ids``, the N tile last. Any other kernel runs as it is."""
    if kernel not in GROUPED_KERNELS:
        return run_kernel(kernel, args, config, *index_dtype)
    names = list(inspect.signature(kernel.fn).parameters)
    at = names.index("block_expert_ids") + 1
    tables = expert_group_tables(args[at - 1], args[names.index("W")].shape[0], most_blocks)
    config, block_n = expert_group_config(config)
    args = (*args[:at], *tables, *args[at:], block_n)
    return run_kernel(GROUPED_KERNELS[kernel], args, config, *index_dtype)


@contextlib.contextmanager
def expert_groups(layer_module, most_blocks=None):
    """``layer_module`` (helion_moe.layer or helion_moe.fp8) routing in single-block runs and
    running its flat kernels in expert groups, while the context lasts."""
    run = functools.partial(run_kernel_expert_groups, most_blocks=most_blocks)
    with (
        mock.patch.object(layer_module, "flat_run_blocks", lambda *_: 1),
        mock.patch.object(layer_module, "run_kernel", run),
    ):
        yield
