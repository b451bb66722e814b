"""GPU probe: transformers' compiled static-cache decode (``generate()`` with
``cache_implementation="static"``, whose decode step transformers compiles and runs in CUDA
graphs) with each experts backend, on models built from real configs with a few layers and
random bf16 weights.

    python probes/decode_probe.py SECTION [SECTION ...]   (sections: see SECTIONS at the end)

Each backend generates 9 and 73 tokens after one compiling call; a decode step's time is the
difference over the 64 extra steps, the median of three. Every backend runs in the same process
on the same card. With few layers the generate loop's host work can set the pace, not the GPU:
the ``generate_kernels`` section lists the GPU kernels of one generate() to tell.
$DECODE_MODELS (comma-separated names of CONFIGS) picks the models; all when unset.
"""

import moe_helpers as mh

import os
import time

import torch
import transformers
from probe_common import record, run_sections
from torch.profiler import ProfilerActivity, profile

# The decoder layers of each model: as many as an 80 GB card holds beside the vocabulary and
# batched_mm's per-pair weight copies (experts' weights: 1.2, 2.8 and 22.5 GB a layer). With 2
# layers Qwen3-30B-A3B's step is paced by generate()'s host loop (``generate_kernels``).
LAYERS = {"Qwen3-30B-A3B": 12, "Mixtral-8x7B": 8, "DeepSeek-V3": 2}

CONFIGS = {
    "Qwen3-30B-A3B": lambda layers: transformers.Qwen3MoeConfig(
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_experts=128,
        num_experts_per_tok=8,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        num_hidden_layers=layers,
        vocab_size=151936,
        max_position_embeddings=4096,
    ),
    "Mixtral-8x7B": lambda layers: transformers.MixtralConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_local_experts=8,
        num_experts_per_tok=2,
        num_attention_heads=32,
        num_key_value_heads=8,
        num_hidden_layers=layers,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
    "DeepSeek-V3": lambda layers: transformers.DeepseekV3Config(
        hidden_size=7168,
        intermediate_size=18432,
        moe_intermediate_size=2048,
        n_routed_experts=256,
        num_experts_per_tok=8,
        n_shared_experts=1,
        n_group=8,
        topk_group=4,
        first_k_dense_replace=0,
        num_hidden_layers=layers,
        vocab_size=129280,
        max_position_embeddings=4096,
    ),
}
BACKENDS = ("helion", "grouped_mm", "batched_mm")
OPTIONS = dict(do_sample=False, cache_implementation="static", max_cache_len=96, pad_token_id=0)


def random_model(name):
    """The model of ``CONFIGS[name]`` on the GPU, random bf16 weights, "helion" registered."""
    mh.register_transformers_experts()
    torch.manual_seed(0)
    with torch.device("cuda"):
        config = CONFIGS[name](LAYERS[name])
        return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()


@torch.no_grad()
def decode_step_ms(model, prompt, backend):
    """Milliseconds per compiled decode step of ``model`` with ``backend``, and its tokens."""
    model.set_experts_implementation(backend)
    torch._dynamo.reset()
    model.generate(prompt, max_new_tokens=73, **OPTIONS)  # compiles; the cache fits 73 tokens
    step_ms = []
    for _ in range(3):
        seconds = {}
        for new_tokens in (9, 73):
            torch.cuda.synchronize()
            start = time.perf_counter()
            tokens = model.generate(prompt, max_new_tokens=new_tokens, **OPTIONS)
            torch.cuda.synchronize()
            seconds[new_tokens] = time.perf_counter() - start
        step_ms.append((seconds[73] - seconds[9]) / 64 * 1e3)
    return sorted(step_ms)[1], tokens


def chosen_models():
    """The names in $DECODE_MODELS, in CONFIGS' order; all of CONFIGS when unset."""
    names = os.environ.get("DECODE_MODELS")
    return [name for name in CONFIGS if names is None or name in names.split(",")]


def decode_tokens_per_second():
    """Tokens per second of each backend at batch 1 and 8; the share of greedy tokens equal to
    grouped_mm's (bf16 rounding sends random-weight models' near-flat logits apart)."""
    for name in chosen_models():
        model = random_model(name)
        for batch in (1, 8):
            prompt = torch.randint(0, model.config.vocab_size, (batch, 16), device="cuda")
            rates, tokens = {}, {}
            for backend in BACKENDS:
                try:
                    ms, tokens[backend] = decode_step_ms(model, prompt, backend)
                except torch.OutOfMemoryError:  # batched_mm's prefill copies weights per pair
                    torch.cuda.empty_cache()
                    record(
                        "generate", model=name, batch=batch, backend=backend, error="out of memory"
                    )
                    continue
                rates[backend] = batch / ms * 1e3
                row = dict(model=name, layers=LAYERS[name], batch=batch, backend=backend)
                record(
                    "generate", **row, step_ms=round(ms, 3), tokens_per_s=round(rates[backend], 1)
                )
            others = [rate for backend, rate in rates.items() if backend != "helion"]
            if "helion" in rates and others:
                speedup = round(rates["helion"] / max(others), 2)
                record("generate", model=name, batch=batch, helion_speedup=speedup)
            if "grouped_mm" in tokens:  # the share of generated tokens equal to grouped_mm's
                new = {b: t[:, prompt.shape[1] :] for b, t in tokens.items()}
                same = {b: (t == new["grouped_mm"]).float().mean().item() for b, t in new.items()}
                record("generate", model=name, batch=batch, same_new_tokens=same)
        del model
        torch.cuda.empty_cache()


@torch.no_grad()
def decode_kernels():
    """The GPU kernels of one generate() of 33 tokens (32 compiled decode steps) of the first
    chosen model, batch 1, with each backend, and the GPU and host time."""
    name = chosen_models()[0]
    model = random_model(name)
    prompt = torch.randint(0, model.config.vocab_size, (1, 16), device="cuda")
    for backend in BACKENDS:
        model.set_experts_implementation(backend)
        torch._dynamo.reset()
        model.generate(prompt, max_new_tokens=33, **OPTIONS)
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            model.generate(prompt, max_new_tokens=33, **OPTIONS)
            torch.cuda.synchronize()
        events = prof.key_averages()
        print(events.table(sort_by="device_time_total", row_limit=12, max_name_column_width=60))
        gpu_ms = sum(e.self_device_time_total for e in events) / 1e3
        host_ms = sum(e.self_cpu_time_total for e in events) / 1e3
        row = dict(model=name, layers=LAYERS[name], backend=backend)
        record("generate_kernels", **row, gpu_ms=round(gpu_ms, 2), host_ms=round(host_ms, 2))


SECTIONS = {"generate": decode_tokens_per_second, "generate_kernels": decode_kernels}

if __name__ == "__main__":
    run_sections(SECTIONS)
