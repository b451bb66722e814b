"""Expert parallelism (notebook 12): the experts sharded over the ranks of a torch.distributed
group, with counts, dispatch and combine by ``all_to_all_single``, and a launcher that starts the
ranks as processes (gloo on the CPU, NCCL on GPUs) and ends them.

Each spawned rank imports this module anew, and with it ``helion_moe.mode`` first, so a CPU rank
sets up Triton's interpreter before Triton loads, as the parent did.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .layer import moe_experts
from .matmul import pair_weights, sum_over_experts
from .mode import ON_GPU
from .routing import as_top_k, route_zipf_top_k
from .validation import validate_down_weights, validate_moe_inputs

__all__ = [
    "EXPERT_PARALLEL_PHASES",
    "EXPERT_PARALLEL_TIMEOUT",
    "NCCL_ENVIRONMENT",
    "ExpertParallelCase",
    "expert_parallel_backend",
    "expert_parallel_worker",
    "moe_experts_expert_parallel",
    "pairs_by_rank",
    "run_expert_parallel",
]

# Collectives give up after this long, so a rank that never arrives fails the others.
EXPERT_PARALLEL_TIMEOUT = datetime.timedelta(seconds=120)


# NVLink multicast (NVLS) stays off in every process: an all-to-all does not use it, and not
# every machine offers it.
NCCL_ENVIRONMENT = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


EXPERT_PARALLEL_PHASES = ("counts", "dispatch", "experts", "combine")


def expert_parallel_backend(device: torch.device) -> str:
    """The torch.distributed backend for tensors on ``device``: NCCL for CUDA, gloo for the CPU.

    Taught in notebook 12.
    """
    return "nccl" if device.type == "cuda" else "gloo"


def pairs_by_rank(
    expert_ids: torch.Tensor,  # [T, k] global expert ids
    experts_per_rank: int,
    world_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # ([P] pair order, [world] int64 pairs per rank)
    """The dispatch plan: the (token, expert) pairs, numbered ``t * k + j``, in the order they
    are sent (grouped by the rank that holds their expert, in pair order within a rank), and
    how many go to each rank.

    Taught in notebook 12.
    """
    pair_ranks = expert_ids.flatten().long() // experts_per_rank
    order = torch.argsort(pair_ranks, stable=True)
    return order, torch.bincount(pair_ranks, minlength=world_size)


def _as_bytes(rows: torch.Tensor) -> torch.Tensor:  # [R, C] -> [R, C * itemsize] uint8
    width = rows.shape[1] * rows.element_size()
    return rows.contiguous().view(torch.uint8).view(rows.shape[0], width)


def _input_problem(
    A: torch.Tensor,
    W_gate_up: torch.Tensor,
    W_down: torch.Tensor,
    expert_ids: torch.Tensor,
    combine_weights: torch.Tensor | None,
    num_experts: int,
    world_size: int,
) -> str | None:
    """What is wrong with one rank's input to ``moe_experts_expert_parallel`` (None if
    nothing): found before any collective, so that every rank can be told."""
    if not isinstance(num_experts, int) or num_experts <= 0 or num_experts % world_size:
        return (
            f"num_experts={num_experts!r} must be a positive multiple of the world size "
            f"{world_size}, so that each rank holds the same number of experts"
        )
    try:
        validate_moe_inputs(A, W_gate_up, expert_ids, combine_weights, weight_name="W_gate_up")
        validate_down_weights(W_gate_up, W_down)
    except (TypeError, ValueError) as error:
        return f"{type(error).__name__}: {error}"
    if W_gate_up.shape[0] != num_experts // world_size:
        return (
            f"W_gate_up holds {W_gate_up.shape[0]} experts, but num_experts={num_experts} over "
            f"{world_size} ranks is {num_experts // world_size} per rank"
        )
    if expert_ids.numel():
        lowest, highest = torch.stack(torch.aminmax(expert_ids.flatten().long())).tolist()
        if lowest < 0 or highest >= num_experts:
            bad = lowest if lowest < 0 else highest
            return f"expert_ids must lie in [0, num_experts={num_experts}), found {bad}"
    return None


def moe_experts_expert_parallel(
    A: torch.Tensor,  # [T, K] this rank's tokens
    W_gate_up: torch.Tensor,  # [E / world, K, 2I] this rank's experts (either layout)
    W_down: torch.Tensor,  # [E / world, I, N]
    expert_ids: torch.Tensor,  # [T, k] global expert ids in [0, num_experts)
    combine_weights: torch.Tensor | None = None,  # [T, k]
    *,
    num_experts: int,
    group: torch.distributed.ProcessGroup | None = None,
    activation: str = "silu",
    stats: dict[str, object] | None = None,
) -> torch.Tensor:  # [T, N], A's dtype
    """``moe_experts`` with the experts sharded over the ranks of ``group``: rank r holds
    experts ``r * E/world ... (r + 1) * E/world - 1``, and every rank brings its own tokens.

    1. **counts:** each rank sorts its (token, expert) pairs by the rank that holds the expert
       and tells every rank how many it will send (one ``all_to_all_single`` of [world, 2]
       int64: the count and a flag that says whether this rank's input was valid).
    2. **dispatch:** one ``all_to_all_single`` moves the pairs' token rows, each with its local
       expert id and combine weight packed behind it as bytes.
    3. **experts:** each rank runs ``moe_experts`` (top-1: one pair per row) on what it got.
    4. **combine:** the reverse ``all_to_all_single`` brings each pair's weighted output back;
       each token's k outputs are summed in a fixed order (``sum_over_experts``), so the
       result is the same on every run and matches ``moe_experts`` within its tolerance.

    Bad input on any rank (expert ids out of range, num_experts not a multiple of the world
    size, weights of the wrong shape...) raises a ValueError on every rank, naming the rank,
    instead of leaving the others waiting. The split sizes of an ``all_to_all_single`` are
    Python lists, so each call reads the counts on the host: it waits for the GPU twice, for
    the ids' range check and for the counts. With
    ``stats`` (a dict), the pairs and bytes sent and received and each phase's seconds are
    written into it; on a GPU the phases are then synchronised to be timed.

    Taught in notebook 12.
    """
    dist = torch.distributed
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    device = A.device
    clock = {"start": time.perf_counter()}

    def phase_done(name: str) -> None:
        if stats is not None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            clock[name] = time.perf_counter()

    problem = _input_problem(A, W_gate_up, W_down, expert_ids, combine_weights, num_experts, world)
    if problem is None:
        experts_per_rank = num_experts // world
        ids = as_top_k(expert_ids)
        T, top_k = ids.shape
        order, send_counts = pairs_by_rank(ids, experts_per_rank, world)
    else:
        send_counts = torch.zeros(world, dtype=torch.long, device=device)
    header = torch.stack([send_counts, torch.full_like(send_counts, problem is not None)], 1)
    received = torch.empty_like(header)
    dist.all_to_all_single(received, header.contiguous(), group=group)
    bad_ranks = received[:, 1].nonzero().flatten().tolist()
    if bad_ranks:
        problems = [None] * world
        dist.all_gather_object(problems, problem, group=group)
        details = "; ".join(f"rank {r}: {problems[r]}" for r in bad_ranks)
        raise ValueError(
            f"moe_experts_expert_parallel got bad input on rank(s) {bad_ranks}: {details}"
        )
    send, recv = send_counts.tolist(), received[:, 0].tolist()
    phase_done("counts")

    weights = pair_weights(expert_ids, combine_weights).flatten()[order]
    local_ids = (ids.flatten()[order] % experts_per_rank).to(torch.int32)
    meta = torch.stack([local_ids, weights.view(torch.int32)], 1)  # [P, 2] int32
    outgoing = torch.cat([_as_bytes(A[order // top_k]), _as_bytes(meta)], 1)
    incoming = outgoing.new_empty(sum(recv), outgoing.shape[1])
    dist.all_to_all_single(incoming, outgoing, recv, send, group=group)
    row_bytes = A.shape[1] * A.element_size()
    rows = incoming[:, :row_bytes].contiguous().view(A.dtype)
    meta = incoming[:, row_bytes:].contiguous().view(torch.int32)
    phase_done("dispatch")

    outputs = moe_experts(
        rows, W_gate_up, W_down, meta[:, 0], meta[:, 1].view(torch.float32), activation=activation
    )  # [received pairs, N], each weighted
    phase_done("experts")

    N = W_down.shape[2]
    returned = outgoing.new_empty(sum(send), N * A.element_size())
    dist.all_to_all_single(returned, _as_bytes(outputs), send, recv, group=group)
    pair_outputs = torch.empty(T * top_k, N, dtype=A.dtype, device=device)
    pair_outputs[order] = returned.view(A.dtype)
    out = sum_over_experts(pair_outputs.view(T, top_k, N))
    phase_done("combine")
    if stats is not None:
        stats.update(
            rank=rank,
            pairs_sent=send,
            pairs_received=recv,
            dispatch_bytes_sent=sum(send[r] for r in range(world) if r != rank) * outgoing.shape[1],
            combine_bytes_sent=sum(recv[r] for r in range(world) if r != rank) * returned.shape[1],
            seconds={
                name: clock[name] - clock[previous]
                for previous, name in zip(
                    ("start", *EXPERT_PARALLEL_PHASES[:-1]), EXPERT_PARALLEL_PHASES, strict=True
                )
            },
        )
    return out


def _expert_parallel_process(
    rank: int,
    world_size: int,
    init_file: Path,
    worker: Callable[..., object],
    args: tuple[object, ...],
    out_dir: Path,
) -> None:
    """One rank of ``run_expert_parallel``: join the group, run the worker, save its result
    (or its traceback) under ``out_dir``, leave the group."""
    import traceback

    try:
        device = torch.device("cuda", rank) if ON_GPU else torch.device("cpu")
        if ON_GPU:
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(
            expert_parallel_backend(device),
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world_size,
            timeout=EXPERT_PARALLEL_TIMEOUT,
        )
        torch.save(worker(rank, world_size, device, *args), out_dir / f"{rank}.pt")
    except BaseException:
        (out_dir / f"{rank}.err").write_text(traceback.format_exc())
        raise SystemExit(1) from None
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_expert_parallel(
    world_size: int,
    worker: Callable[..., object],  # a module-level function: worker(rank, world, device, *args)
    *args: object,
    on_gpus: bool = False,
    timeout_s: float = 300.0,
) -> list[object]:  # the workers' results, by rank
    """Run ``worker`` in ``world_size`` new processes, one rank each of a torch.distributed
    group, and return what each returned.

    With ``on_gpus``, rank r runs on GPU r over NCCL (at most one rank per GPU). Otherwise the
    processes see no GPU (``CUDA_VISIBLE_DEVICES=""``), so the kernels run in Triton's CPU
    interpreter and the group uses gloo: the same code on a laptop and on a GPU machine.
    Every process runs with ``NCCL_ENVIRONMENT``. The processes are started with "spawn" and
    ended here: joined until ``timeout_s``, then killed by their pids. Raises RuntimeError
    with each failed rank's traceback, or TimeoutError naming the ranks that did not finish.

    Taught in notebook 12.
    """
    if on_gpus and world_size > torch.cuda.device_count():
        raise ValueError(
            f"world_size={world_size} with on_gpus needs {world_size} GPUs, this machine has "
            f"{torch.cuda.device_count()}"
        )
    context = torch.multiprocessing.get_context("spawn")
    child_environment = {**NCCL_ENVIRONMENT}
    if not on_gpus:
        child_environment.update(CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
    saved = {name: os.environ.get(name) for name in child_environment}
    with tempfile.TemporaryDirectory() as directory:
        out_dir = Path(directory)
        processes = [
            context.Process(
                target=_expert_parallel_process,
                args=(rank, world_size, out_dir / "init", worker, args, out_dir),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        os.environ.update(child_environment)  # the children read it at start
        try:
            for process in processes:
                process.start()
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        deadline = time.monotonic() + timeout_s
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
        killed = [rank for rank, process in enumerate(processes) if process.is_alive()]
        for rank in killed:
            processes[rank].kill()
            processes[rank].join()
        errors = {
            rank: (out_dir / f"{rank}.err").read_text()
            for rank in range(world_size)
            if (out_dir / f"{rank}.err").exists()
        }
        if errors:
            raise RuntimeError(
                "\n".join(
                    f"rank {rank} failed:\n{text.strip().splitlines()[-1]}"
                    for rank, text in errors.items()
                )
            )
        if killed:
            raise TimeoutError(f"ranks {killed} did not finish within {timeout_s} s; killed")
        lost = [rank for rank in range(world_size) if not (out_dir / f"{rank}.pt").exists()]
        if lost:
            codes = [processes[rank].exitcode for rank in lost]
            raise RuntimeError(
                f"ranks {lost} exited with codes {codes} before reporting (see their stderr; a "
                "script that starts them needs an `if __name__ == '__main__':` guard)"
            )
        return [
            torch.load(out_dir / f"{rank}.pt", weights_only=False) for rank in range(world_size)
        ]


@dataclasses.dataclass(frozen=True)
class ExpertParallelCase:
    """A layer and a routing that every rank rebuilds from the same seed, so that each can take
    its share: rank r holds experts ``r * E / world ...`` and the r-th slice of the tokens.

    Taught in notebook 12.
    """

    T: int  # tokens over all ranks
    H: int
    I: int  # noqa: E741
    E: int
    top_k: int
    routing: str = "uniform"  # "uniform", "zipf" (skew 1.5), or "first half": the experts
    # [0, E / 2) only, so that the ranks holding the others receive nothing
    dtype: torch.dtype = torch.float32
    seed: int = 0
    bad_id_rank: int | None = None  # this rank routes its first pair to expert E (bad input)
    warm_up: bool = False  # call the layer once before the call that is timed (compiles it)

    def inputs(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """A [T, H], W_gate_up [E, H, 2I], W_down [E, I, H], expert_ids and weights [T, k]."""
        g = torch.Generator().manual_seed(self.seed)
        A = torch.randn(self.T, self.H, generator=g)
        W_gate_up = torch.randn(self.E, self.H, 2 * self.I, generator=g) / self.H**0.5
        W_down = torch.randn(self.E, self.I, self.H, generator=g) / self.I**0.5
        experts = self.E // 2 if self.routing == "first half" else self.E
        skew = 1.5 if self.routing == "zipf" else 0.0
        ids = route_zipf_top_k(self.T, experts, skew, self.top_k, seed=self.seed, device="cpu")
        weights = torch.softmax(torch.randn(self.T, self.top_k, generator=g), dim=1)
        tensors = (A, W_gate_up, W_down, ids, weights)
        return tuple(
            t.to(device, self.dtype) if t.is_floating_point() else t.to(device) for t in tensors
        )


def expert_parallel_worker(
    rank: int, world_size: int, device: torch.device, case: ExpertParallelCase
) -> dict[str, object]:
    """One rank's run of ``case`` through ``moe_experts_expert_parallel``: its tokens' output
    and the layer's stats (for ``run_expert_parallel``).

    Taught in notebook 12.
    """
    A, W_gate_up, W_down, ids, weights = case.inputs(device)
    tokens = torch.tensor_split(torch.arange(case.T), world_size)[rank]
    experts = slice(rank * case.E // world_size, (rank + 1) * case.E // world_size)
    ids = ids[tokens]
    if rank == case.bad_id_rank:
        ids[0, 0] = case.E
    args = (A[tokens], W_gate_up[experts], W_down[experts], ids, weights[tokens])
    if case.warm_up:
        moe_experts_expert_parallel(*args, num_experts=case.E)
    stats = {}
    out = moe_experts_expert_parallel(*args, num_experts=case.E, stats=stats)
    return {"tokens": tokens, "output": out.cpu(), "stats": stats}
