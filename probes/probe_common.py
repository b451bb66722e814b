"""What the speed probes share: the rows they record, the layer's SwiGLU, the inputs of one
expert GEMM, and the runner that each probe file calls under ``__main__``:

    python probes/<file>.py SECTION [SECTION ...]   (sections: see that file's SECTIONS)

The runner prints the machine, runs the named sections in order (a section that raises, or a
name that is not a section, is recorded as an error row and the next one runs), prints each
one's seconds, and with $OUT set writes $OUT/probe_<sections>.json (the machine and every row).
The probe files: metadata_probe.py (routing metadata), matmul_probe.py (moe_matmul, one GEMM),
layer_probe.py (the layer's forward), backward_probe.py (the layer's backward as it runs),
backward_kernels_probe.py (other backward kernels and schedules), gpt_oss_probe.py (gpt-oss's
experts), decode_probe.py (transformers' compiled decode with each experts backend), fp8_probe.py
(the FP8 experts), prefill_probe.py (schedule options of the layer's kernels at prefill, and
what its combine kernel gains).
"""

import moe_helpers as mh

import json
import os
import sys
import time

import helion
import torch

ROWS = []

SWIGLU = tuple(mh.GatedActivation())  # the gated kernels' compile-time activation


def chosen(variable, known):
    """The names in $variable (comma-separated; all of ``known`` when unset), refusing any
    that ``known`` lacks, so a typo does not make an empty run."""
    names = os.environ.get(variable)
    if names is None:
        return list(known)
    unknown = set(names.split(",")) - set(known)
    if unknown:
        raise ValueError(f"${variable} names {sorted(unknown)}; known: {list(known)}")
    return [name for name in known if name in names.split(",")]


def chosen_tokens(variable, default):
    """The token counts in $variable (comma-separated), ``default`` when unset."""
    return tuple(map(int, os.environ.get(variable, default).split(",")))


def with_options(config, options):
    """``config`` (a helion.Config) with the entries of ``options`` added or replaced."""
    return helion.Config(**{**config.config, **options})


def record(section, **row):
    ROWS.append({"section": section, **row})
    print(section, json.dumps(row), flush=True)


def inputs(shape, top_k, skew=0.0, seed=0):
    A, W = mh.benchmark_inputs(shape, seed)
    logits = mh.gating_logits(A, shape.E, seed=seed)
    if skew:  # Zipf-skewed preference on top of the gate's logits
        logits = logits + skew * torch.log(mh.zipf_probabilities(shape.E, 1.0)).to(logits)
    expert_ids, weights = mh.route_top_k(logits, top_k)
    return A, W, expert_ids, weights


def run_sections(sections):
    """Run the sections named on the command line (``sections``: name -> function)."""
    info = mh.machine_info()
    print(json.dumps(info))
    for name in sys.argv[1:]:
        start = time.perf_counter()
        try:
            sections[name]()
        except Exception as error:  # report and go on to the next section
            record(name, error=repr(error)[:2000])
        print(f"== {name}: {time.perf_counter() - start:.0f} s", flush=True)
    if len(sys.argv) > 1 and "OUT" in os.environ:
        path = f"{os.environ['OUT']}/probe_{'_'.join(sys.argv[1:])}.json"
        with open(path, "w") as f:
            json.dump({"machine": info, "rows": ROWS}, f, indent=1)
