"""The course's code, as every notebook, test and probe imports it: ``import moe_helpers as mh``.

The code lives in the package ``helion_moe`` beside this file, one module per step of the data's
path (``helion_moe/__init__.py`` draws the path); this file re-exports each module's public names
(its ``__all__``), so that ``mh.X`` reaches any of them. Where each name is defined:

helion_moe/mode.py: ON_GPU, DEVICE
helion_moe/routing.py: cpu_generator, route_uniform, zipf_probabilities, route_zipf,
    route_zipf_top_k, gating_logits, route_top_k, as_top_k, expert_load, LoadStats, load_stats
helion_moe/sorting.py: ExpertSort, sort_tokens_by_expert
helion_moe/launch.py: sizes_of_one, run_kernel, MAX_LAUNCHERS, kernel_with_config, triton_code,
    expert_weights_in_place, INT32_MAX, kernel_index_dtype
helion_moe/metadata.py: BlockAlignedRouting, max_blocks, align_to_blocks_reference,
    METADATA_CONFIG, METADATA_STEP, METADATA_TILE, MAX_METADATA_CHUNK, MAX_METADATA_EXPERTS,
    METADATA_PROGRAMS, metadata_chunk, num_metadata_chunks, count_experts_per_chunk,
    place_pairs, check_integer_ids, comparable_expert_ids, align_to_blocks
helion_moe/kernels/seed.py: moe_matmul_ogs, moe_matmul_ogs_masked_store, SeedSchedule,
    seed_schedule
helion_moe/kernels/activations.py: ACTIVATIONS, GatedActivation, GPT_OSS_ACTIVATION,
    as_gated_activation, activation_as_text, activation_from_text, gate_activation,
    gate_activation_slope, gate_up_columns, gated_product, gated_product_grads
helion_moe/kernels/flat.py: moe_matmul_flat, moe_gate_up_flat
helion_moe/kernels/per_pair.py: moe_matmul_per_pair, moe_gate_up_per_pair
helion_moe/kernels/backward.py: moe_weight_grad, moe_matmul_input_backward,
    gated_activation_backward
helion_moe/kernels/combine.py: sum_pair_rows
helion_moe/kernels/fp8.py: FP8_DTYPE, E4M3_MAX, FP8_GROUP, SMALLEST_AMAX, quantize_groups,
    quantize_rows_fp8, moe_matmul_flat_fp8, moe_gate_up_flat_fp8
helion_moe/configs.py: check_config, configs_as_text, configs_from_text, split_token_block,
    COMBINE_CONFIG, HELION_DEFAULT_CONFIG, DEFAULT_CONFIGS, FLAT_CONFIGS, flat_token_block,
    RUN_PADDING_MIN_EXPERT_BYTES, flat_run_blocks, flat_half_tails, RESULTS_DIR,
    TUNED_CONFIGS_PATH, tuned_config_key, this_card, load_tuned_configs, save_tuned_config,
    default_config, PER_PAIR_CONFIGS, PER_PAIR_MAX_PAIRS, WEIGHT_GRAD_CONFIGS,
    PER_PAIR_EXPERTS_PER_PAIR, per_pair_max_pairs, capturing_cuda_graph, choose_implementation,
    GATE_UP_CONFIGS, LAYER_PER_PAIR_MAX_BYTES, LAYER_PER_PAIR_MAX_PAIRS, layer_pairs_are_few,
    layer_path, flat_layer_configs, layer_configs, fp8_configs, ACTIVATION_BACKWARD_CONFIG
helion_moe/validation.py: SUPPORTED_DTYPES, validate_moe_inputs, validate_down_weights,
    validate_biases, needs_grad, runs_through_op, check_expert_id_range, EXPERT_ID_CHECKS,
    check_expert_id_check, UNPLACED_PAIRS_MESSAGE, start_expert_id_check, zero_sentinel_pairs,
    check_output_grad
helion_moe/decode_graphs.py: MAX_DECODE_GRAPHS, REPLAY_MAX_TOKENS, decode_replay,
    host_paced, replay_enabled, replayed_call
helion_moe/matmul.py: IMPLEMENTATIONS, PER_EXPERT_IMPLEMENTATIONS, pair_weights,
    flat_kernel_args, one_token_as_two, output_without_products, sum_over_experts, moe_matmul,
    replays_eager_call, moe_matmul_forward, backward_routing_inputs, moe_matmul_backward,
    moe_matmul_op, moe_matmul_backward_op
helion_moe/layer.py: moe_experts, moe_experts_forward, flat_layer_gemms, moe_experts_per_pair,
    token_expert_weights, expert_sums, moe_experts_backward, down_input_backward, moe_experts_op,
    moe_experts_backward_op
helion_moe/fp8.py: QUANTIZE_CONFIG, quantize_blocks_fp8, quantize_weights_fp8,
    quantize_activations_fp8, dequantize_fp8, validate_fp8_scales, moe_matmul_fp8,
    moe_matmul_fp8_forward, moe_experts_fp8, moe_experts_fp8_forward, moe_matmul_fp8_op,
    moe_experts_fp8_op
helion_moe/references.py: moe_matmul_loop_reference, moe_matmul_reference_fp64,
    moe_matmul_dense_reference, moe_matmul_grouped_mm, activation_reference,
    gated_product_reference, concatenated_gate_up, moe_experts_reference_fp64,
    moe_experts_gather_reference, e4m3_rounding_ambiguity, moe_experts_fp8_reference_fp64
helion_moe/checks.py: TOLERANCES, GRADIENT_TOLERANCES, FP8_TOLERANCE, FP8_HIDDEN_SLACK,
    assert_moe_close, assert_experts_close, assert_moe_fp8_close, assert_experts_fp8_close,
    assert_sum_close, assert_grad_close, MoECase, random_moe_case, seed_store_race_rows
helion_moe/exercises.py: check_weighted_seed_kernel, check_per_expert_bias_kernel,
    check_interleaved_gate_up_kernel, check_weight_grad_nk_kernel, check_rowwise_fp8_kernel
helion_moe/transformers_backend.py: TRANSFORMERS_EXPERTS, transformers_activation,
    transformers_gate, transformers_layer_arguments, transformers_experts_forward,
    transformers_fp8_experts_forward, quantize_experts_fp8, register_transformers_experts,
    TINY_TRANSFORMERS_MODELS, tiny_transformers_model, count_moe_blocks
helion_moe/expert_parallel.py: EXPERT_PARALLEL_TIMEOUT, NCCL_ENVIRONMENT,
    EXPERT_PARALLEL_PHASES, expert_parallel_backend, pairs_by_rank, moe_experts_expert_parallel,
    run_expert_parallel, ExpertParallelCase, expert_parallel_worker
helion_moe/benchmarks/timing.py: time_ms, host_and_gpu_us, cuda_graph_replay, machine_info,
    copy_bandwidth_gbps, dense_matmul_tflops, roofline
helion_moe/benchmarks/shapes.py: MoEShape, MoEModel, MOE_MODELS, GEMMS, MIXTRAL_LIKE,
    FINE_GRAINED, benchmark_inputs, benchmark_routing, model_weights, model_routing
helion_moe/benchmarks/per_expert.py: DECODE_TO_PREFILL_TOKENS, ZIPF_SKEWS,
    SEED_DEFAULT_MAX_TOKENS, HAND_PICKED_CONFIG, BENCHMARKS_PATH, benchmark_candidates,
    CHECKED_CANDIDATES, benchmark_point, run_benchmarks, dense_roof_tflops
helion_moe/benchmarks/flat.py: DECODE_TOKENS, flat_candidates, run_flat_benchmarks,
    CONFIG_RULE_CHECK_GEMMS, CONFIG_RULE_CHECK_TOKENS, CONFIG_SEARCH, CONFIG_RULE_CHECK_PATH,
    run_config_rule_check, config_rule_against_best
helion_moe/benchmarks/model_table.py: MODEL_TABLE_TOKENS, MODEL_TABLE_SKEWS,
    MODEL_TABLE_DECODE_MAX_TOKENS, MODEL_TABLE_CANDIDATES, MODEL_TABLE_CHECKED_ROWS,
    MODEL_TABLE_PATH, BlockStats, block_stats, flat_grid_stats, eager_path, model_table_point,
    run_model_table, model_table_limits
helion_moe/benchmarks/layer_table.py: LAYER_TABLE_TOKENS, LAYER_TABLE_PATH, LAYER_DECODE_PATH,
    TRANSFORMERS_BACKENDS, BATCHED_MM_MAX_BYTES, LAYER_TABLE_CHECKED_ROWS, LAYER_TABLE_MODELS,
    transformers_experts_module, with_experts_backend, unfused_experts, gated_hidden,
    pairs_sorted_by_expert, grouped_mm_experts_core, layer_table_point, with_layer_machine_info,
    run_layer_table, layer_table_speedups
helion_moe/benchmarks/fp8_table.py: FP8_TABLE_MODELS, FP8_TABLE_TOKENS, FP8_TABLE_PATH,
    FP8_TABLE_DECODE_MAX_TOKENS, quantize_rowwise_fp8, scaled_grouped_mm_experts_core,
    fp8_table_point, run_fp8_table
helion_moe/benchmarks/backward_table.py: BACKWARD_TABLE_TOKENS, BACKWARD_TABLE_MODELS,
    BACKWARD_TABLE_PATH, backward_times, BACKWARD_PARTS_PATH, BACKWARD_CANDIDATES,
    BACKWARD_TABLE_MEMORY_SHARE, backward_table_fits, relative_difference, backward_table_point,
    run_backward_table, backward_table_speedups
helion_moe/benchmarks/autotuning.py: HAND_PICKED_FLAT_KERNEL_CONFIGS, AUTOTUNE_BLOCK_T,
    AUTOTUNE_BUDGET_SECONDS, tune_flat_kernel, run_autotuning
helion_moe/benchmarks/serving.py: GENERATE_TABLE_PATH, CALL_TIMELINE_PATH, DECODE_REPLAY_PATH,
    DECODE_REPLAY_TOKENS, DECODE_REPLAY_BACKENDS, GENERATE_TABLE_BACKENDS,
    GENERATE_TABLE_BATCHES, SERVED_MODELS, served_model, decode_step_ms, decode_step_gpu_ms,
    run_generate_table, call_timeline, run_call_timeline, run_decode_replay_table
helion_moe/plots/lessons.py: plot_expert_load, plot_curves, plot_permutation,
    plot_error_histograms, plot_row_errors, plot_gradients
helion_moe/plots/results.py: IMPLEMENTATION_COLORS, GRAPH_SUFFIX, implementation_color,
    plot_prefill_bars, plot_sweep, plot_roofline, plot_time_against_load, plot_flat_prefill,
    plot_decode_bandwidth, plot_model_table, plot_top_k_cost, plot_autotune_trace
helion_moe/plots/layer.py: LAYER_PLOT_CANDIDATES, plot_layer_table, plot_backward_table,
    plot_fp8_table, plot_expert_parallel_load, plot_expert_parallel_time
helion_moe/plots/serving.py: plot_generate_table, plot_call_timeline, plot_decode_replay
helion_moe/explorers.py: explore_routing, routing_explorer, explore_token_blocks,
    token_block_explorer, explore_benchmarks, benchmarks_explorer, explore_model_table,
    model_table_explorer
helion_moe/cli.py: main

``python moe_helpers.py`` runs ``helion_moe.cli.main``: checks of ``moe_matmul``, a GPU benchmark.
"""

from helion_moe.mode import *
from helion_moe.routing import *
from helion_moe.sorting import *
from helion_moe.launch import *
from helion_moe.metadata import *
from helion_moe.kernels.seed import *
from helion_moe.kernels.activations import *
from helion_moe.kernels.flat import *
from helion_moe.kernels.per_pair import *
from helion_moe.kernels.backward import *
from helion_moe.kernels.combine import *
from helion_moe.kernels.fp8 import *
from helion_moe.configs import *
from helion_moe.validation import *
from helion_moe.decode_graphs import *
from helion_moe.matmul import *
from helion_moe.layer import *
from helion_moe.fp8 import *
from helion_moe.references import *
from helion_moe.checks import *
from helion_moe.exercises import *
from helion_moe.transformers_backend import *
from helion_moe.expert_parallel import *
from helion_moe.benchmarks.timing import *
from helion_moe.benchmarks.shapes import *
from helion_moe.benchmarks.per_expert import *
from helion_moe.benchmarks.flat import *
from helion_moe.benchmarks.model_table import *
from helion_moe.benchmarks.layer_table import *
from helion_moe.benchmarks.fp8_table import *
from helion_moe.benchmarks.backward_table import *
from helion_moe.benchmarks.autotuning import *
from helion_moe.benchmarks.serving import *
from helion_moe.plots.lessons import *
from helion_moe.plots.results import *
from helion_moe.plots.layer import *
from helion_moe.plots.serving import *
from helion_moe.explorers import *
from helion_moe.cli import *

if __name__ == "__main__":
    main()
