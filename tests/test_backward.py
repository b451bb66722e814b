"""moe_matmul's backward (dA, dW, d combine_weights) against float64 autograd."""

import moe_helpers as mh

import random

import helion
import pytest
import torch


def random_grad_case(case: int):
    """A small random top-k case with weights, the same everywhere for a given ``case``: T = 1
    and E = 1 among the sizes, K and N not multiples of 16, uniform, Zipf (empty experts) or
    single-expert routing, float32 and bfloat16."""
    rng = random.Random(case)
    T = rng.choice([1, 2, 9, 40])
    K, N = rng.choice([8, 20, 48]), rng.choice([8, 24, 40])
    E = rng.choice([1, 3, 5, 8])
    top_k = rng.choice([k for k in (1, 2, 3) if k <= E])
    routing = rng.choice(["uniform", "zipf", "one expert"])
    if routing == "one expert":
        ids = torch.full((T, 1), E - 1)
        top_k = 1
    else:
        skew = 2.0 if routing == "zipf" else 0.0
        ids = mh.route_zipf_top_k(T, E, skew, top_k, seed=case, device="cpu")
    dtype = rng.choice([torch.float32, torch.bfloat16])
    g = torch.Generator().manual_seed(case)
    A = torch.randn(T, K, generator=g).to(mh.DEVICE, dtype)
    W = torch.randn(E, K, N, generator=g).to(mh.DEVICE, dtype)
    weights = torch.rand(T, top_k, generator=g).to(mh.DEVICE)
    grad = torch.randn(T, N, generator=g).to(mh.DEVICE, dtype)
    return A, W, ids.to(mh.DEVICE), weights, grad


def reference_grads(A, W, ids, weights, grad):
    """dA, dW, d weights from autograd through the dense float64 reference."""
    A64, W64, w64 = (t.detach().double().requires_grad_() for t in (A, W, weights))
    out = sum(
        w64[:, j, None] * mh.moe_matmul_dense_reference(A64, W64, ids[:, j])
        for j in range(ids.shape[1])
    )
    out.backward(grad.double())
    return A64.grad, W64.grad, w64.grad


def kernel_grads(A, W, ids, weights, grad):
    A, W, weights = (t.detach().clone().requires_grad_() for t in (A, W, weights))
    mh.moe_matmul(A, W, ids, weights).backward(grad)
    return A.grad, W.grad, weights.grad


@pytest.mark.parametrize("case", range(16))
def test_gradients_match_float64_autograd_on_random_cases(case):
    A, W, ids, weights, grad = random_grad_case(case)
    expected = reference_grads(A, W, ids, weights, grad)
    actual = kernel_grads(A, W, ids, weights, grad)
    for name, a, b in zip(("dA", "dW", "d combine_weights"), actual, expected, strict=True):
        mh.assert_grad_close(a, b, A.dtype, name)


def test_random_grad_cases_cover_the_edges():
    cases = [random_grad_case(case) for case in range(16)]
    assert {c[0].shape[0] for c in cases} >= {1}
    assert {c[1].shape[0] for c in cases} >= {1}
    assert {c[0].dtype for c in cases} == {torch.float32, torch.bfloat16}
    empty = [c for c in cases if (mh.expert_load(c[2].flatten(), c[1].shape[0]) == 0).any()]
    assert empty, "no case leaves an expert without pairs"


def test_an_expert_without_pairs_gets_an_exact_zero_and_gradients_are_deterministic():
    A = torch.randn(10, 16, device=mh.DEVICE)
    W = torch.randn(4, 16, 24, device=mh.DEVICE)
    ids = torch.tensor([[0, 1], [1, 3]] * 5, device=mh.DEVICE)  # expert 2 gets nothing
    weights = torch.rand(10, 2, device=mh.DEVICE)
    grad = torch.randn(10, 24, device=mh.DEVICE)
    first, again = kernel_grads(A, W, ids, weights, grad), kernel_grads(A, W, ids, weights, grad)
    assert torch.equal(first[1][2], torch.zeros(16, 24, device=mh.DEVICE))
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)


def test_weights_in_the_nn_linear_layout_get_their_gradient_in_place():
    W_nk = torch.randn(3, 24, 16, device=mh.DEVICE, requires_grad=True)  # [E, N, K]
    A = torch.randn(7, 16, device=mh.DEVICE)
    ids = mh.route_uniform(7, 3, seed=2)
    grad = torch.randn(7, 24, device=mh.DEVICE)
    mh.moe_matmul(A, W_nk.transpose(1, 2), ids).backward(grad)
    _, expected, _ = reference_grads(
        A, W_nk.detach().transpose(1, 2), ids[:, None], torch.ones(7, 1, device=mh.DEVICE), grad
    )
    mh.assert_grad_close(W_nk.grad.transpose(1, 2), expected, torch.float32, "dW")


@pytest.mark.parametrize("case", [0, 13])  # top-3 over 5 and 3 experts, bf16 and float32
def test_all_three_gradients_with_weights_in_the_nn_linear_layout(case):
    # moe_matmul_input_backward reads [E, N, K] storage through its nk_layout flag
    A, W, ids, weights, grad = random_grad_case(case)
    W_nk = W.transpose(1, 2).contiguous().requires_grad_()
    A_, w_ = (t.detach().clone().requires_grad_() for t in (A, weights))
    mh.moe_matmul(A_, W_nk.transpose(1, 2), ids, w_).backward(grad)
    actual = (A_.grad, W_nk.grad.transpose(1, 2), w_.grad)
    expected = reference_grads(A, W, ids, weights, grad)
    for name, a, b in zip(("dA", "dW", "d combine_weights"), actual, expected, strict=True):
        mh.assert_grad_close(a, b, A.dtype, name)


@pytest.mark.parametrize("case", [0, 13])
def test_dA_alone_with_weights_in_the_nn_linear_layout(case):
    # dA alone runs the flat kernel on W^T: for weights stored [E, N, K], the stored tensor
    A, W, ids, weights, grad = random_grad_case(case)
    W_nk = W.transpose(1, 2).contiguous()  # needs no gradient, nor do the weights
    A_ = A.detach().clone().requires_grad_()
    mh.moe_matmul(A_, W_nk.transpose(1, 2), ids, weights).backward(grad)
    expected = reference_grads(A, W, ids, weights, grad)[0]
    mh.assert_grad_close(A_.grad, expected, A.dtype, "dA")


def test_only_the_gradients_asked_for_are_computed():
    A, W, ids, weights, grad = random_grad_case(2)
    A = A.detach().clone().requires_grad_()
    mh.moe_matmul(A, W, ids, weights).backward(grad)  # W and the weights need none
    expected = reference_grads(A, W, ids, weights, grad)[0]
    mh.assert_grad_close(A.grad, expected, A.dtype, "dA")
    top_1 = mh.moe_matmul(A, W, ids[:, 0])  # top-1 without weights
    (dA,) = torch.autograd.grad(top_1, A, grad)
    mh.assert_grad_close(
        dA,
        reference_grads(A, W, ids[:, :1], torch.ones_like(weights[:, :1]), grad)[0],
        A.dtype,
        "dA",
    )


def test_empty_batches_get_empty_or_zero_gradients():
    A = torch.randn(0, 8, device=mh.DEVICE, requires_grad=True)
    W = torch.randn(2, 8, 4, device=mh.DEVICE, requires_grad=True)
    out = mh.moe_matmul(A, W, torch.zeros(0, dtype=torch.long, device=mh.DEVICE))
    out.sum().backward()
    assert A.grad.shape == (0, 8) and torch.equal(W.grad, torch.zeros_like(W))


def test_a_forward_token_block_past_the_backward_tables_still_trains():
    A, W, ids, weights, grad = random_grad_case(3)
    A, W, w = (t.detach().clone().requires_grad_() for t in (A, W, weights))
    config = helion.Config(block_sizes=[256, 16, 16])  # FLAT_CONFIGS' largest block is 128
    mh.moe_matmul(A, W, ids, w, config=config).backward(grad)
    expected = reference_grads(A, W, ids, weights, grad)
    actual = A.grad, W.grad, w.grad
    for name, a, b in zip(("dA", "dW", "d combine_weights"), actual, expected, strict=True):
        mh.assert_grad_close(a, b, A.dtype, name)


def test_bad_gradients_and_implementations_are_refused():
    A, W, ids, weights, _ = random_grad_case(0)
    T, N = A.shape[0], W.shape[2]
    needs = (True, True, True)
    with pytest.raises(ValueError, match=r"gradient of moe_matmul's output must have its shape"):
        mh.moe_matmul_backward(
            torch.ones(T, N + 1, device=mh.DEVICE), A, W, ids, weights, None, needs
        )
    with pytest.raises(TypeError, match="must be a floating-point tensor"):
        mh.moe_matmul_backward(torch.ones(T, N, dtype=torch.int32), A, W, ids, weights, None, needs)
    with pytest.raises(ValueError, match="implementation 'per_pair' has no backward"):
        mh.moe_matmul(A.requires_grad_(), W, ids, weights, implementation="per_pair")


def test_float64_is_refused_so_gradcheck_is_replaced_by_the_float64_reference():
    # The kernels' tl.dot takes 16- and 32-bit floats only, so torch.autograd.gradcheck (which
    # needs float64) cannot run them; the tests above compare with float64 autograd instead.
    A = torch.randn(3, 8, dtype=torch.float64, device=mh.DEVICE, requires_grad=True)
    W = torch.randn(2, 8, 4, dtype=torch.float64, device=mh.DEVICE)
    with pytest.raises(TypeError, match=r"A has dtype torch\.float64"):
        mh.moe_matmul(A, W, torch.tensor([0, 1, 1], device=mh.DEVICE))


def random_layer_grad_case(case: int):
    """A small random layer for its gradients: T = 1 and E = 1 among the sizes, both weight
    layouts and activations, float32 and bfloat16."""
    rng = random.Random(100 + case)
    T = rng.choice([1, 3, 17])
    K, I, N = rng.choice([8, 20]), rng.choice([8, 12]), rng.choice([16, 24])  # noqa: E741
    E = rng.choice([1, 3, 6])
    top_k = rng.choice([k for k in (1, 2) if k <= E])
    ids = mh.route_zipf_top_k(T, E, rng.choice([0.0, 2.0]), top_k, seed=case, device="cpu")
    dtype = rng.choice([torch.float32, torch.bfloat16])
    g = torch.Generator().manual_seed(case)
    A = torch.randn(T, K, generator=g).to(mh.DEVICE, dtype)
    W_gate_up = (torch.randn(E, K, 2 * I, generator=g) / K**0.5).to(mh.DEVICE, dtype)
    W_down = (torch.randn(E, I, N, generator=g) / I**0.5).to(mh.DEVICE, dtype)
    weights = torch.rand(T, top_k, generator=g).to(mh.DEVICE)
    grad = torch.randn(T, N, generator=g).to(mh.DEVICE, dtype)
    return (
        A,
        W_gate_up,
        W_down,
        ids.to(mh.DEVICE),
        weights,
        grad,
        rng.choice(mh.ACTIVATIONS),
        rng.random() < 0.5,
    )


def assert_layer_grads_match_float64(actual, A, W_gate_up, W_down, ids, weights, grad, activation):
    """The layer's four gradients ``actual`` against float64 autograd through the gather
    reference, each with ``mh.assert_grad_close`` at A's dtype."""
    reference = [t.detach().double().requires_grad_() for t in (A, W_gate_up, W_down, weights)]
    mh.moe_experts_gather_reference(*reference[:3], ids, reference[3], activation).backward(
        grad.double()
    )
    for name, a, b in zip(
        ("dA", "dW_gate_up", "dW_down", "d combine_weights"), actual, reference, strict=True
    ):
        mh.assert_grad_close(a, b.grad, A.dtype, name)


@pytest.mark.parametrize("case", range(10))
def test_layer_gradients_match_float64_autograd(case):
    A, W_gate_up, W_down, ids, weights, grad, activation, nk = random_layer_grad_case(case)
    leaves = [t.detach().clone().requires_grad_() for t in (A, W_gate_up, W_down, weights)]
    if nk:  # weights stored [E, N, K] as transformers does, passed as transposed views
        stored = [leaves[i].detach().transpose(1, 2).contiguous().requires_grad_() for i in (1, 2)]
        out = mh.moe_experts(
            leaves[0],
            stored[0].transpose(1, 2),
            stored[1].transpose(1, 2),
            ids,
            leaves[3],
            activation=activation,
        )
    else:
        out = mh.moe_experts(*leaves[:3], ids, leaves[3], activation=activation)
    out.backward(grad)
    actual = (
        [leaves[0].grad, *(s.grad.transpose(1, 2) for s in stored), leaves[3].grad]
        if nk
        else [leaf.grad for leaf in leaves]
    )
    assert_layer_grads_match_float64(actual, A, W_gate_up, W_down, ids, weights, grad, activation)


@pytest.mark.parametrize(
    "num_experts, top_k", [(384, 8), (512, 10), (mh.MAX_METADATA_EXPERTS, 16)]
)  # Kimi-K2's experts and top-k, Qwen3-Next's, and the most the metadata takes with top-16
def test_layer_gradients_with_hundreds_of_experts_match_float64(num_experts, top_k):
    T, K, I, N = 24, 16, 8, 16  # noqa: E741
    # uniform routing: under one pair per expert on average (Zipf routing piled 21 pairs on one
    # expert, whose tf32 sums on a GPU went past the tolerance)
    ids = mh.route_zipf_top_k(T, num_experts, 0.0, top_k, seed=num_experts, device="cpu")
    g = torch.Generator().manual_seed(num_experts)
    A = torch.randn(T, K, generator=g).to(mh.DEVICE)
    W_gate_up = (torch.randn(num_experts, K, 2 * I, generator=g) / K**0.5).to(mh.DEVICE)
    W_down = (torch.randn(num_experts, I, N, generator=g) / I**0.5).to(mh.DEVICE)
    weights = torch.rand(T, top_k, generator=g).to(mh.DEVICE)
    grad = torch.randn(T, N, generator=g).to(mh.DEVICE)
    ids = ids.to(mh.DEVICE)
    assert mh.layer_path(ids.numel(), W_gate_up, W_down) == "flat"
    leaves = [t.detach().clone().requires_grad_() for t in (A, W_gate_up, W_down, weights)]
    out = mh.moe_experts(*leaves[:3], ids, leaves[3])
    mh.assert_experts_close(out.detach(), A, W_gate_up, W_down, ids, weights)
    out.backward(grad)
    actual = [leaf.grad for leaf in leaves]
    assert_layer_grads_match_float64(actual, A, W_gate_up, W_down, ids, weights, grad, "silu")


def test_random_layer_grad_cases_cover_both_layouts_activations_and_paths():
    cases = [random_layer_grad_case(case) for case in range(10)]
    assert {c[7] for c in cases} == {True, False}
    assert {c[6] for c in cases} == set(mh.ACTIVATIONS)
    assert 1 in {c[0].shape[0] for c in cases} and 1 in {c[1].shape[0] for c in cases}
    # The per-pair forward keeps gate and up too; on the CPU's smaller pair bound some cases
    # run flat as well, and the next test runs the flat forward at few tokens everywhere
    paths = {mh.layer_path(c[3].numel(), c[1], c[2]) for c in cases}
    assert "per_pair" in paths and (mh.ON_GPU or "flat" in paths)


@pytest.mark.parametrize("T", [1, 5])
def test_layer_gradients_on_the_flat_path_at_few_tokens(T):
    """The flat forward at one token runs it as two (``one_token_as_two``) and keeps the gate
    and up of the first copy only; the backward doubles them again."""
    A, W_gate_up, W_down, ids, weights, grad, activation, _ = random_layer_grad_case(0)
    A, ids, weights, grad = (
        t[:1].expand(T, *t.shape[1:]).contiguous() for t in (A, ids, weights, grad)
    )
    configs = mh.GATE_UP_CONFIGS[A.dtype][16], mh.FLAT_CONFIGS[A.dtype][16]
    leaves = [t.detach().clone().requires_grad_() for t in (A, W_gate_up, W_down, weights)]
    out = mh.moe_experts(*leaves[:3], ids, leaves[3], activation=activation, configs=configs)
    out.backward(grad)
    actual = [leaf.grad for leaf in leaves]
    assert_layer_grads_match_float64(actual, A, W_gate_up, W_down, ids, weights, grad, activation)


@pytest.mark.parametrize("name", mh.TINY_TRANSFORMERS_MODELS)
def test_one_training_step_of_a_transformers_model_matches_eager(name):
    mh.register_transformers_experts()
    losses, grads = {}, {}
    for implementation in ("eager", "helion"):
        model = mh.tiny_transformers_model(name).train()
        model.set_experts_implementation(implementation)
        input_ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
        input_ids = input_ids.to(mh.DEVICE)
        loss = model(input_ids, labels=input_ids).loss
        loss.backward()
        losses[implementation] = loss.item()
        grads[implementation] = {
            n: p.grad for n, p in model.named_parameters() if p.grad is not None
        }
    tol = mh.TOLERANCES[torch.float32]  # on a GPU the kernels' float32 dots run in tf32
    assert abs(losses["helion"] - losses["eager"]) < tol * abs(losses["eager"])
    assert grads["helion"].keys() == grads["eager"].keys()
    experts = [n for n in grads["eager"] if "gate_up_proj" in n or "down_proj" in n]
    assert experts, "no expert weights got a gradient"
    for parameter, expected in grads["eager"].items():
        mh.assert_grad_close(
            grads["helion"][parameter], expected.double(), torch.float32, parameter
        )


def test_the_layer_backward_refuses_a_gradient_of_the_wrong_shape():
    A, W_gate_up, W_down, ids, weights, grad, activation, _ = random_layer_grad_case(1)
    needs = (True, True, True, True, False, False)  # no biases
    inputs = (A, W_gate_up, W_down, ids, weights)
    activation = mh.GatedActivation(activation)
    _, gate_up = mh.moe_experts_forward(*inputs, activation, None, "device", keep_gate_up=True)
    rest = (*inputs, gate_up, activation, needs)
    with pytest.raises(ValueError, match=r"gradient of moe_experts' output must have its shape"):
        mh.moe_experts_backward(grad[:, :-1], *rest)
    with pytest.raises(TypeError, match="must be a floating-point tensor"):
        mh.moe_experts_backward(grad.int(), *rest)


def with_sentinels(ids: torch.Tensor, num_experts: int, case: int) -> torch.Tensor:
    """``ids`` with about a third of the pairs, and every pair of token 0, marked as another
    rank's (id E, transformers' sentinel)."""
    marked = ids.clone()
    g = torch.Generator().manual_seed(case)
    marked[(torch.rand(ids.shape, generator=g) < 0.3).to(ids.device)] = num_experts
    marked[0] = num_experts
    return marked


@pytest.mark.parametrize("case", range(6))
def test_sentinel_pairs_add_zero_to_moe_matmul_and_its_gradients(case):
    A, W, ids, weights, grad = random_grad_case(case)
    marked = with_sentinels(ids, W.shape[0], case)
    own = marked < W.shape[0]
    # the reference: the sentinel pairs given any valid expert and a weight of zero
    valid_ids, own_weights = torch.where(own, marked, 0), weights * own
    expected = list(reference_grads(A, W, valid_ids, own_weights, grad))
    expected[2] = expected[2] * own  # a sentinel pair's weight gets no gradient either
    leaves = [t.detach().clone().requires_grad_() for t in (A, W, weights)]
    out = mh.moe_matmul(*leaves[:2], marked, leaves[2], expert_id_check="sentinels")
    mh.assert_moe_close(out.detach(), A, W, valid_ids, own_weights)
    out.backward(grad)
    for name, leaf, b in zip(("dA", "dW", "d combine_weights"), leaves, expected, strict=True):
        mh.assert_grad_close(leaf.grad, b, A.dtype, name)
    per_pair = mh.moe_matmul(
        A, W, marked, weights, implementation="per_pair", expert_id_check="sentinels"
    )
    mh.assert_moe_close(per_pair, A, W, valid_ids, own_weights)


@pytest.mark.parametrize("case", range(4))
def test_sentinel_pairs_add_zero_to_the_layer_and_its_gradients(case):
    A, W_gate_up, W_down, ids, weights, grad, activation, _ = random_layer_grad_case(case)
    marked = with_sentinels(ids, W_gate_up.shape[0], case)
    own = marked < W_gate_up.shape[0]
    valid_ids, own_weights = torch.where(own, marked, 0), weights * own
    reference = [t.detach().double().requires_grad_() for t in (A, W_gate_up, W_down, own_weights)]
    mh.moe_experts_gather_reference(*reference[:3], valid_ids, reference[3], activation).backward(
        grad.double()
    )
    leaves = [t.detach().clone().requires_grad_() for t in (A, W_gate_up, W_down, weights)]
    options = dict(activation=activation, expert_id_check="sentinels")
    out = mh.moe_experts(*leaves[:3], marked, leaves[3], **options)
    mh.assert_experts_close(out.detach(), A, W_gate_up, W_down, valid_ids, own_weights, activation)
    out.backward(grad)
    names = ("dA", "dW_gate_up", "dW_down", "d combine_weights")
    for i, (name, leaf, b) in enumerate(zip(names, leaves, reference, strict=True)):
        expected = b.grad * own if i == 3 else b.grad
        mh.assert_grad_close(leaf.grad, expected, A.dtype, name)
    per_pair = (mh.PER_PAIR_CONFIGS[A.dtype],) * 2
    out = mh.moe_experts(A, W_gate_up, W_down, marked, weights, configs=per_pair, **options)
    mh.assert_experts_close(out, A, W_gate_up, W_down, valid_ids, own_weights, activation)


def test_sentinels_are_refused_by_the_per_expert_kernels():
    A, W, ids, _, _ = random_grad_case(0)
    with pytest.raises(ValueError, match="expert_id_check='sentinels' runs 'flat' or 'per_pair'"):
        mh.moe_matmul(A, W, ids[:, 0], implementation="seed", expert_id_check="sentinels")
