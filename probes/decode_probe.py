"""GPU probe: transformers' compiled static-cache decode (``generate()`` with
``cache_implementation="static"``, whose decode step transformers compiles and runs in CUDA
graphs) with each experts backend, on models built from real configs with a few layers and
random bf16 weights (``mh.served_model``).

    python probes/decode_probe.py SECTION [SECTION ...]   (sections: see SECTIONS at the end)

``generate``: ``mh.run_generate_table`` for the models of ``mh.SERVED_MODELS`` named in
$DECODE_MODELS (comma-separated; all when unset), written to $OUT/generate_table.csv.
``whole_model``: the same at Qwen3-30B-A3B's full depth (48 layers, 61 GB of bf16 weights: one
80 GB card holds it at batch 1), written to $OUT/generate_whole_model.csv.
``generate_kernels``: the GPU kernels of one generate() of the first chosen model with each
backend (torch.profiler's table), and the GPU and host time: with few layers the generate
loop's host work can set the pace, not the GPU.
"""

import moe_helpers as mh

import os
from pathlib import Path

import torch
from probe_common import record, run_sections
from torch.profiler import ProfilerActivity, profile


def chosen_models() -> tuple[tuple[str, int], ...]:
    """The (name, layers) of ``mh.SERVED_MODELS`` named in $DECODE_MODELS; all when unset."""
    names = os.environ.get("DECODE_MODELS")
    return tuple(m for m in mh.SERVED_MODELS if names is None or m[0] in names.split(","))


def decode_tokens_per_second():
    path = Path(os.environ.get("OUT", ".")) / "generate_table.csv"
    table = mh.run_generate_table(models=chosen_models(), path=path)
    for row in table.to_dict("records"):
        record("generate", **{key: row[key] for key in list(row)[:9]})


def decode_whole_model():
    path = Path(os.environ.get("OUT", ".")) / "generate_whole_model.csv"
    models = (("Qwen3-30B-A3B", 48),)
    table = mh.run_generate_table(models=models, batches=(1,), path=path)
    for row in table.to_dict("records"):
        record("whole_model", **{key: row[key] for key in list(row)[:9]})


@torch.no_grad()
def decode_kernels():
    """The GPU kernels of one generate() of 33 tokens (32 compiled decode steps) of the first
    chosen model, batch 1, with each backend, and the GPU and host time."""
    name, layers = chosen_models()[0]
    model = mh.served_model(name, layers)
    prompt = torch.randint(0, model.config.vocab_size, (1, 16), device="cuda")
    options = dict(do_sample=False, cache_implementation="static", pad_token_id=0)
    for backend in mh.GENERATE_TABLE_BACKENDS:
        model.set_experts_implementation(backend)
        torch._dynamo.reset()
        model.generate(prompt, max_new_tokens=33, **options)
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            model.generate(prompt, max_new_tokens=33, **options)
            torch.cuda.synchronize()
        events = prof.key_averages()
        print(events.table(sort_by="device_time_total", row_limit=12, max_name_column_width=60))
        gpu_ms = sum(e.self_device_time_total for e in events) / 1e3
        host_ms = sum(e.self_cpu_time_total for e in events) / 1e3
        row = dict(model=name, layers=layers, backend=backend)
        record("generate_kernels", **row, gpu_ms=round(gpu_ms, 2), host_ms=round(host_ms, 2))


SECTIONS = {
    "generate": decode_tokens_per_second,
    "whole_model": decode_whole_model,
    "generate_kernels": decode_kernels,
}

if __name__ == "__main__":
    run_sections(SECTIONS)
