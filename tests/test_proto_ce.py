"""Tests of proto_ce: cross-entropy over a subset of class prototypes (issue 3).

Every check compares the compiled op with an independent computation: the plain-PyTorch reference
(F.cross_entropy over the materialised logits, autograd for the gradients), in float64 where the op
runs in a lower precision, or torch's own gradcheck / opcheck. CUDA tests (marked `cuda`) run only where
a GPU is visible; they need the CUDA kernels compiled (nvcc present) and fail loudly otherwise.
"""
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import proto_ce
from proto_ce import proto_cross_entropy, reference_proto_cross_entropy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE_FORCED = os.environ.get("PROTO_CE_BACKEND", "").lower() == "reference"
needs_extension_cpu = pytest.mark.skipif(REFERENCE_FORCED or proto_ce.backend("cpu") != "extension-cpu",
                                         reason="the CPU extension is not loaded (see test_cpu_extension_is_loaded)")

# Ragged shapes from the issue (nothing a multiple of a tile size), and one with fewer sampled prototypes
# than embedding dimensions, like the SL shape (V=100 of D=1024: the CPU one-pass kernel then keeps a
# block's logits in the grad_x rows it writes last).
SMALL = dict(B=7, D=13, K=50, V=17)
LARGE = dict(B=130, D=257, K=4099, V=1025)
NARROW_V = dict(B=37, D=70, K=300, V=29)
# Every class sampled (SL with its full vocabulary): the dense w gradient [K, D] is then too small to lend
# its memory to the CPU one-pass kernel's buffers, which it allocates instead.
FULL_VOCAB = dict(B=37, D=70, K=29, V=29)


def make_inputs(B, D, K, V, dtype=torch.float32, device="cpu", seed=0, scale=14.0, scale_dtype=None):
    """l2-normalised x [B, D] and w [K, D], a sorted random subset idx [V], labels drawn from idx."""
    gen = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(B, D, generator=gen, dtype=torch.float64), dim=1)
    w = F.normalize(torch.randn(K, D, generator=gen, dtype=torch.float64), dim=1)
    idx = torch.randperm(K, generator=gen)[:V].sort().values
    labels = idx[torch.randint(V, (B,), generator=gen)]
    if scale_dtype is None:
        scale_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    logit_scale = torch.tensor(scale, dtype=scale_dtype)
    return (x.to(device, dtype), w.to(device, dtype), idx.to(device), labels.to(device), logit_scale.to(device))


def loss_and_grads(fn, x, w, idx, labels, logit_scale, reduction="mean", upstream=None):
    """Runs fn forward and backward on leaf copies; returns (loss, grad_x, grad_w, grad_scale)."""
    x, w, logit_scale = (t.detach().clone().requires_grad_() for t in (x, w, logit_scale))
    loss = fn(x, w, idx, labels, logit_scale, reduction=reduction)
    upstream = torch.ones_like(loss) if upstream is None else upstream.to(loss.device, loss.dtype)
    loss.backward(upstream)
    return loss.detach(), x.grad, w.grad, logit_scale.grad


def rel_err(a, b):
    """||a - b|| / ||b|| in float64 (b != 0)."""
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def outside_idx_rows(grad_w, idx):
    keep = torch.ones(grad_w.shape[0], dtype=torch.bool, device=grad_w.device)
    keep[idx] = False
    return grad_w[keep]


def force_small_chunks(monkeypatch, shape):
    """About 8 column chunks (two-pass kernels), and 3 row blocks and 4-6 slices of the embedding dimensions
    (one-pass kernel), ragged at the end."""
    monkeypatch.setenv("PROTO_CE_CHUNK_COLS", str(max(2, shape["V"] // 8 - 1)))
    monkeypatch.setenv("PROTO_CE_CHUNK_ROWS", str(max(2, shape["B"] // 3 + 1)))
    monkeypatch.setenv("PROTO_CE_SLICE_DIMS", str(max(2, shape["D"] // 4 - 1)))


def force_small_blocks_whole_slices(monkeypatch, shape):
    """3 row blocks that each meet all D embedding dimensions at once (the CPU one-pass kernel then gathers
    w[idx] once and sums the w gradient over the blocks in a [V, D] buffer: inside the dense w gradient, its
    path at the SL and DINO shapes, except for FULL_VOCAB, where that is too small)."""
    force_small_chunks(monkeypatch, shape)
    monkeypatch.setenv("PROTO_CE_SLICE_DIMS", str(shape["D"]))


@pytest.fixture
def kernels(request, monkeypatch):
    """"one-pass": mean / sum use xent_fused (the default); "two-pass": they use xent_forward/_backward."""
    monkeypatch.setattr(proto_ce._LOADED, "one_pass", request.param == "one-pass")
    return request.param


# ---------------------------------------------------------------------------------------------------
# CPU: the op against the reference
# ---------------------------------------------------------------------------------------------------

def test_cpu_extension_is_loaded():
    if REFERENCE_FORCED:
        pytest.skip("PROTO_CE_BACKEND=reference")
    assert proto_ce.backend("cpu") == "extension-cpu", (
        "the C++ extension did not build or load; run `python -c 'import proto_ce'` with PROTO_CE_VERBOSE=1")


REDUCTION_PATHS = [("mean", "one-pass"), ("sum", "one-pass"), ("mean", "two-pass"), ("sum", "two-pass"),
                   ("none", "two-pass")]


@pytest.mark.parametrize("chunks", ["auto-chunks", "small-chunks", "small-blocks-whole-slices"])
@pytest.mark.parametrize("reduction,kernels", REDUCTION_PATHS, indirect=["kernels"],
                         ids=[f"{r}-{k}" for r, k in REDUCTION_PATHS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", [SMALL, LARGE, NARROW_V, FULL_VOCAB],
                         ids=["7x13x50x17", "130x257x4099x1025", "37x70x300x29", "37x70x29x29"])
def test_matches_reference(shape, dtype, reduction, kernels, chunks, monkeypatch):
    if chunks == "small-chunks":
        force_small_chunks(monkeypatch, shape)
    elif chunks == "small-blocks-whole-slices":
        force_small_blocks_whole_slices(monkeypatch, shape)
    inputs = make_inputs(**shape, dtype=dtype)
    upstream = None
    if reduction == "none":  # distinct per-sample weights, so per-row gradients are checked too
        upstream = torch.rand(shape["B"], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = loss_and_grads(proto_cross_entropy, *inputs, reduction=reduction, upstream=upstream)
    want = loss_and_grads(reference_proto_cross_entropy, *inputs, reduction=reduction, upstream=upstream)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    assert got[0].dtype == want[0].dtype and got[0].shape == want[0].shape
    for name, a, b in zip(("loss", "grad_x", "grad_w", "grad_scale"), got, want):
        assert rel_err(a, b) < tol, f"{name}: relative error {rel_err(a, b):.2e}"
    idx = inputs[2]
    assert torch.count_nonzero(outside_idx_rows(got[2], idx)) == 0, "rows of w outside idx got a gradient"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_non_contiguous_inputs(reduction, device):
    """Strided views (every other column of wider tensors, a transposed w, strided idx and labels) give
    the same loss and gradients as the reference on contiguous copies."""
    x, w, idx, labels, s = make_inputs(**NARROW_V, dtype=torch.float64, device=device)
    x_view = torch.cat([x, torch.zeros_like(x)], dim=1).view(x.shape[0], 2, -1).transpose(1, 2)[:, :, 0]
    w_view = w.t().contiguous().t()
    idx_view = torch.stack([idx, idx], dim=1)[:, 0]
    labels_view = torch.stack([labels, labels], dim=1)[:, 1]
    assert not any(t.is_contiguous() for t in (x_view, w_view, idx_view, labels_view))
    assert torch.equal(x_view, x) and torch.equal(w_view, w)

    def run(fn, x, w, idx, labels):
        x, w, scale = (t.detach().clone() if t is s else t.detach() for t in (x, w, s))
        x.requires_grad_(), w.requires_grad_(), scale.requires_grad_()
        loss = fn(x, w, idx, labels, scale, reduction=reduction).sum()
        loss.backward()
        return loss.detach(), x.grad, w.grad, scale.grad

    got = run(proto_cross_entropy, x_view, w_view, idx_view, labels_view)
    want = run(reference_proto_cross_entropy, x, w, idx, labels)
    for name, a, b in zip(("loss", "grad_x", "grad_w", "grad_scale"), got, want):
        assert rel_err(a, b) < 1e-10, name


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_autocast_leaves_the_op_unchanged(reduction, device):
    """Inside torch.autocast the op computes in its inputs' dtype, exactly as outside (its kernels call
    matmuls that autocast would otherwise turn into bf16 ones), forward and backward."""
    inputs = make_inputs(**NARROW_V, device=device)
    upstream = torch.linspace(0.5, 2.0, NARROW_V["B"]) if reduction == "none" else None
    want = loss_and_grads(proto_cross_entropy, *inputs, reduction=reduction, upstream=upstream)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        got = loss_and_grads(proto_cross_entropy, *inputs, reduction=reduction, upstream=upstream)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_inputs_cpu_against_float64(dtype):
    """fp16/bf16 inputs: float32 loss; compared with the float64 loss of the same (rounded) inputs."""
    x, w, idx, labels, s = make_inputs(**LARGE, dtype=dtype)
    got = loss_and_grads(proto_cross_entropy, x, w, idx, labels, s)
    want = loss_and_grads(reference_proto_cross_entropy, x.double(), w.double(), idx, labels, s.double())
    assert got[0].dtype == torch.float32
    assert got[1].dtype == dtype and got[2].dtype == dtype and got[3].dtype == torch.float32
    assert rel_err(got[0], want[0]) < 1e-5
    for name, a, b in zip(("grad_x", "grad_w", "grad_scale"), got[1:], want[1:]):
        assert rel_err(a, b) < 1e-2, f"{name}: relative error {rel_err(a, b):.2e}"


@needs_extension_cpu
@pytest.mark.parametrize("reduction,expected", [("mean", "xentfused"), ("sum", "xentfused"), ("none", "xentforward")])
def test_kernel_path_used(reduction, expected):
    x, w, idx, labels, s = make_inputs(**SMALL)
    loss = proto_cross_entropy(x.requires_grad_(), w, idx, labels, s, reduction=reduction)
    # the op's autograd node: GeneratedBackwardFor_proto_ce_xent_forward_... (formula registered from Python)
    # or torch::autograd::CppNode<...XentFused> (registered in C++)
    name = loss.grad_fn.name()
    assert expected in name.lower().replace("_", ""), name


@pytest.mark.parametrize("upstream", [2.5, 0.0, -1.0])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_upstream_gradient_other_than_one(reduction, upstream):
    """The one-pass kernel computes gradients for an upstream gradient of 1 and hands them over as they
    are when it is 1; any other upstream gradient must scale them."""
    inputs = make_inputs(**SMALL, dtype=torch.float64)
    upstream = torch.tensor(upstream, dtype=torch.float64)
    got = loss_and_grads(proto_cross_entropy, *inputs, reduction=reduction, upstream=upstream)
    want = loss_and_grads(reference_proto_cross_entropy, *inputs, reduction=reduction, upstream=upstream)
    for name, a, b in zip(("loss", "grad_x", "grad_w", "grad_scale"), got, want):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), name


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_backward_twice_with_retain_graph(reduction):
    """Saved tensors are not modified by a backward pass: a second one adds the same gradients again."""
    x, w, idx, labels, s = (t.requires_grad_() if t.is_floating_point() else t for t in make_inputs(**SMALL))
    loss = proto_cross_entropy(x, w, idx, labels, s, reduction=reduction).sum()
    loss.backward(retain_graph=True)
    once = [t.grad.clone() for t in (x, w, s)]
    loss.backward()
    for t, g in zip((x, w, s), once):
        assert torch.allclose(t.grad, 2 * g, rtol=1e-6, atol=0)


def test_hand_made_case():
    """Two prototypes, one sample: loss = log(1 + exp(s * (x.w1 - x.w0))) for label idx[0]."""
    x = torch.tensor([[0.6, 0.8]], dtype=torch.float64)
    w = torch.tensor([[9.0, 9.0], [1.0, 0.0], [5.0, 5.0], [0.0, 1.0]], dtype=torch.float64)
    idx = torch.tensor([1, 3])
    labels = torch.tensor([1])
    s = torch.tensor(2.0, dtype=torch.float64)
    expected = torch.log1p(torch.exp(torch.tensor(2.0 * (0.8 - 0.6), dtype=torch.float64)))
    assert torch.allclose(proto_cross_entropy(x, w, idx, labels, s), expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("chunks", ["auto-chunks", "small-chunks"])
def test_frozen_prototypes_get_no_gradient(chunks, monkeypatch):
    """w without requires_grad (the frozen CLIP heads of Sec. 4.1): x and scale still get gradients. (No
    dense w gradient to lend memory: the CPU one-pass kernel gathers w[idx] in slices, forced small here.)"""
    if chunks == "small-chunks":
        force_small_chunks(monkeypatch, LARGE)
    x, w, idx, labels, s = make_inputs(**LARGE)
    x.requires_grad_()
    s.requires_grad_()
    proto_cross_entropy(x, w, idx, labels, s).backward()
    x_ref, s_ref = x.detach().clone().requires_grad_(), s.detach().clone().requires_grad_()
    reference_proto_cross_entropy(x_ref, w, idx, labels, s_ref).backward()
    assert w.grad is None
    assert rel_err(x.grad, x_ref.grad) < 2e-5 and rel_err(s.grad, s_ref.grad) < 2e-5


def cpu_step_memory(step, leaves):
    """(peak extra bytes, peak of the temporaries) of one forward + backward `step` after a warm-up one:
    torch.profiler's allocation trace, as in benchmarks/harness.py. The leaves' gradients are cleared first."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from harness import peak_extra_bytes

    def clear():
        for t in leaves:
            t.grad = None

    step()
    clear()
    return peak_extra_bytes(step, clear, "cpu")


@needs_extension_cpu
def test_cpu_temporaries_below_quarter_of_eager():
    """Memory, not time (issue 3's CPU target, SL shape): what one forward + backward allocates and frees
    again before it ends is at most a quarter of eager's. Eager's w[idx] alone is [V, D]; the op keeps it,
    its w gradient rows and its logits in the memory of the gradients it returns."""
    x, w, idx, labels, s = make_inputs(B=256, D=1024, K=1000, V=100)
    target = torch.searchsorted(idx, labels)
    leaves = [t.requires_grad_() for t in (x, w, s)]
    temporaries = {
        "op": cpu_step_memory(lambda: proto_cross_entropy(x, w, idx, labels, s).backward(), leaves)[1],
        "eager": cpu_step_memory(lambda: proto_ce.reference_loss_from_positions(x, w, idx, target, s).backward(),
                                 leaves)[1]}
    assert 0 < temporaries["op"] <= temporaries["eager"] / 4, temporaries


@needs_extension_cpu
@pytest.mark.parametrize("rows_per_block", [None, 40], ids=["one-block", "row-blocks"])
def test_cpu_one_pass_temporaries_smaller_than_a_logits_block(rows_per_block, monkeypatch):
    """Where w needs a gradient and its dense [K, D] can hold them, the one-pass kernel keeps w[idx], dZ and
    the dW rows in that gradient's memory: besides the returned gradients it allocates less than one
    [rows, V] logits block (a few per-row vectors), with one row block and with several."""
    if rows_per_block:
        monkeypatch.setenv("PROTO_CE_CHUNK_ROWS", str(rows_per_block))
    shape = dict(B=200, D=64, K=3000, V=300)  # V > D: z too lives in the w gradient
    x, w, idx, labels, s = make_inputs(**shape)
    leaves = [t.requires_grad_() for t in (x, w, s)]
    peak, temporaries = cpu_step_memory(lambda: proto_cross_entropy(x, w, idx, labels, s).backward(), leaves)
    block_bytes = min(shape["B"], rows_per_block or shape["B"]) * shape["V"] * 4
    assert temporaries < block_bytes, (temporaries, block_bytes)
    # what stays allocated after the step: the two gradients and a few scalars, nothing leaked
    assert peak - temporaries <= (shape["B"] + shape["K"]) * shape["D"] * 4 + 1024, peak


def test_zero_scale_gradient_is_finite():
    """d loss / d scale at scale == 0 (uniform softmax) = mean_b (mean_v z_bv - z_b,target)."""
    x, w, idx, labels, _ = make_inputs(**SMALL, dtype=torch.float64)
    s = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    loss = proto_cross_entropy(x, w, idx, labels, s)
    loss.backward()
    z = x @ w[idx].T
    target = torch.searchsorted(idx, labels)
    expected = (z.mean(1) - z.gather(1, target[:, None])[:, 0]).mean()
    assert torch.allclose(loss, torch.log(torch.tensor(float(len(idx)), dtype=torch.float64)))
    assert torch.allclose(s.grad, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("reduction,kernels", [("mean", "one-pass"), ("sum", "two-pass"), ("none", "two-pass")],
                         indirect=["kernels"], ids=["mean-one-pass", "sum-two-pass", "none"])
def test_gradcheck_float64(reduction, kernels, monkeypatch):
    shape = dict(B=3, D=4, K=9, V=5)
    force_small_chunks(monkeypatch, shape)  # 2 columns per chunk, 2 rows per block
    x, w, idx, labels, s = make_inputs(**shape, dtype=torch.float64, scale=3.0)
    x, w, s = x.requires_grad_(), w.requires_grad_(), s.requires_grad_()

    def loss(x, w, s):
        return proto_cross_entropy(x, w, idx, labels, s, reduction=reduction)

    assert torch.autograd.gradcheck(loss, (x, w, s))


@needs_extension_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_opcheck(dtype):
    x, w, idx, labels, s = make_inputs(B=5, D=6, K=12, V=7, dtype=dtype)
    target_pos = torch.searchsorted(idx, labels)
    torch.library.opcheck(torch.ops.proto_ce.label_positions.default, (idx, labels, w.shape[0]))
    args = (x.requires_grad_(), w.requires_grad_(), idx, target_pos, s.requires_grad_())
    torch.library.opcheck(torch.ops.proto_ce.xent_forward.default, args)
    loss, lse = torch.ops.proto_ce.xent_forward(*(a.detach() for a in args))
    for needs in [(True, True, True), (True, False, False), (False, True, True)]:
        torch.library.opcheck(torch.ops.proto_ce.xent_backward.default,
                              (torch.rand_like(loss), x.detach(), w.detach(), idx, target_pos, s.detach(), lse, *needs))
    for mean, needs in [(True, (True, True, True)), (False, (False, True, False))]:
        fused_args = (x.detach().requires_grad_(needs[0]), w.detach().requires_grad_(needs[1]), idx, target_pos,
                      s.detach().requires_grad_(needs[2]), mean, *needs)
        torch.library.opcheck(torch.ops.proto_ce.xent_fused.default, fused_args)


@pytest.mark.parametrize("chunks", ["auto-chunks", "small-chunks"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bit_identical_second_run(reduction, chunks, monkeypatch):
    if chunks == "small-chunks":
        force_small_chunks(monkeypatch, LARGE)
    inputs = make_inputs(**LARGE)
    first = loss_and_grads(proto_cross_entropy, *inputs, reduction=reduction)
    second = loss_and_grads(proto_cross_entropy, *inputs, reduction=reduction)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_fullgraph(reduction):
    """Dynamo + AOTAutograd trace the op (fake kernels, autograd formula) in one graph, no breaks."""
    inputs = make_inputs(**SMALL)

    def loss_fn(x, w, idx, labels, s, reduction="mean"):
        return proto_cross_entropy(x, w, idx, labels, s, reduction=reduction) * 2.0

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    got = loss_and_grads(compiled, *inputs, reduction=reduction)
    want = loss_and_grads(loss_fn, *inputs, reduction=reduction)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-6, atol=0)


@pytest.mark.slow
def test_torch_compile_inductor():
    inputs = make_inputs(**SMALL)
    compiled = torch.compile(proto_cross_entropy, fullgraph=True)
    got = loss_and_grads(compiled, *inputs)
    want = loss_and_grads(reference_proto_cross_entropy, *inputs)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 2e-5


# ---------------------------------------------------------------------------------------------------
# Bad input: one-line ValueErrors naming the problem (op and reference alike)
# ---------------------------------------------------------------------------------------------------

def _bad_inputs():
    """(case id, function of the good inputs returning bad ones, expected message fragment)."""
    def with_(**changes):
        def make(x, w, idx, labels, s):
            args = dict(x=x, w=w, idx=idx, labels=labels, logit_scale=s)
            args.update({k: v(args) for k, v in changes.items()})
            return args
        return make

    return [
        ("x-1d", with_(x=lambda a: a["x"][0]), "x must be 2-d"),
        ("w-3d", with_(w=lambda a: a["w"][None]), "w must be 2-d"),
        ("D-mismatch", with_(w=lambda a: a["w"][:, :-1]), "x has D=13 but w has D=12"),
        ("x-integer", with_(x=lambda a: a["x"].long(), w=lambda a: a["w"].long()), "x must be float16/bfloat16/float32/float64"),
        ("dtype-mismatch", with_(w=lambda a: a["w"].double()), "x is torch.float32 but w is torch.float64"),
        ("idx-int32", with_(idx=lambda a: a["idx"].int()), "idx must be a 1-d int64 tensor"),
        ("idx-2d", with_(idx=lambda a: a["idx"][None]), "idx must be a 1-d int64 tensor"),
        ("labels-int32", with_(labels=lambda a: a["labels"].int()), "labels must be a 1-d int64 tensor"),
        ("labels-length", with_(labels=lambda a: a["labels"][:-1]), "labels has 6 entries but x has B=7 rows"),
        ("scale-1d", with_(logit_scale=lambda a: a["logit_scale"][None]), "logit_scale must be a 0-d tensor"),
        ("scale-integer", with_(logit_scale=lambda a: torch.tensor(3)), "logit_scale must be a floating tensor"),
        ("scale-float", with_(logit_scale=lambda a: 14.0), "logit_scale must be a torch.Tensor"),
        ("empty-batch", with_(x=lambda a: a["x"][:0], labels=lambda a: a["labels"][:0]), "empty batch (B == 0)"),
        ("no-features", with_(x=lambda a: a["x"][:, :0], w=lambda a: a["w"][:, :0]), "D == 0"),
        ("empty-idx", with_(idx=lambda a: a["idx"][:0]), "idx is empty (V == 0)"),
        ("idx-unsorted", with_(idx=lambda a: a["idx"].flip(0)), "idx is not sorted"),
        ("idx-duplicate", with_(idx=lambda a: torch.cat([a["idx"][:3], a["idx"][2:]])), "duplicate class id"),
        ("idx-negative", with_(idx=lambda a: torch.cat([torch.tensor([-1]), a["idx"]])), "outside [0, 50)"),
        ("idx-too-large", with_(idx=lambda a: torch.cat([a["idx"], torch.tensor([50])])), "outside [0, 50)"),
        ("label-not-in-idx", with_(labels=lambda a: torch.where(
            torch.arange(7) == 3, _missing_class(a["idx"], 50), a["labels"])), "which is not in idx"),
        ("label-beyond-K", with_(labels=lambda a: torch.where(
            torch.arange(7) == 0, torch.tensor(10**6), a["labels"])), "class id 1000000 (labels[0]) which is not in idx"),
        ("device-mismatch", with_(x=lambda a: a["x"].to("meta")), "all inputs must be on one device"),
    ]


def _missing_class(idx, K):
    present = torch.zeros(K, dtype=torch.bool)
    present[idx] = True
    return torch.nonzero(~present)[0, 0]


@pytest.mark.parametrize("fn", [proto_cross_entropy, reference_proto_cross_entropy], ids=["op", "reference"])
@pytest.mark.parametrize("case_id,make_bad,message", _bad_inputs(), ids=[c[0] for c in _bad_inputs()])
def test_bad_input(fn, case_id, make_bad, message):
    bad = make_bad(*make_inputs(**SMALL))
    with pytest.raises(ValueError) as info:
        fn(**bad)
    text = str(info.value)
    assert message in text and "\n" not in text.strip(), text


def test_bad_reduction():
    with pytest.raises(ValueError, match="reduction must be 'mean', 'sum' or 'none'"):
        proto_cross_entropy(*make_inputs(**SMALL), reduction="avg")


@needs_extension_cpu
@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils)")
def test_extension_error_messages_use_no_stream():
    """The extension's argument checks never format into a std::ostream: on the GPU machine's torch 2.11 an
    integer written into one from the extension crashed the process (csrc/proto_ce.h, message_part). Reads
    their calls (and tail jumps) in the disassembly; the checks are kept out of line for this. (Inline error
    paths of torch's own headers, such as a dtype dispatch's default case, still use streams; the checks
    keep the ops from reaching them.)"""
    listing = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", proto_ce._LOADED.where],
                             capture_output=True, text=True, check=True).stdout
    function, streaming, found = None, set(), set()
    for line in listing.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            function = header.group(1)
        elif function and re.match(r"proto_ce::(\(anonymous namespace\)::|dino::)*(check_|fail_)", function):
            name = function.replace("(anonymous namespace)::", "").split("(")[0].split("::")[-1]
            found.add(name)
            if re.search(r"\b(call|jmp)\b.*(ostringstream|ostream_insert|ostream::_M_insert|ostream::operator<<|"
                         r"_str_wrapper|c10::str\b)", line):
                streaming.add(name)
    checks = {"check_sorted_unique_ids", "fail_label_not_in_idx", "check_label_args", "check_kernel_args",
              "check_backward_args", "check_target_positions", "check_idx", "check_args"}
    assert checks <= found, f"not found in the disassembly: {sorted(checks - found)}"
    assert not streaming, f"these format error messages with a stream: {sorted(streaming)}"


# label_positions(idx, labels, 10) with a bad idx or label (the good idx is [1, 4, 9]), and its error
LABEL_POSITION_CASES = [
    (torch.tensor([4, 1, 9]), torch.tensor([4]), "idx is not sorted (idx[0]=4 > idx[1]=1)"),
    (torch.tensor([1, 4, 4]), torch.tensor([4]), "duplicate class id 4"),
    (torch.tensor([1, 4, 12]), torch.tensor([4]), "class id 12 outside [0, 10)"),
    (torch.tensor([1, 4, 9]), torch.tensor([4, 5]), "class id 5 (labels[1]) which is not in idx")]


@needs_extension_cpu
def test_kernel_validation_messages():
    """The C++ op itself (direct torch.ops call) rejects bad idx / labels with the same messages, as a
    RuntimeError (proto_cross_entropy turns them into ValueError; see proto_ce._value_errors)."""
    idx = torch.tensor([1, 4, 9])
    for bad_idx, labels, message in LABEL_POSITION_CASES:
        with pytest.raises(RuntimeError, match=re.escape(message)):
            torch.ops.proto_ce.label_positions(bad_idx, labels, 10)
    assert torch.equal(torch.ops.proto_ce.label_positions(idx, torch.tensor([9, 1, 4]), 10), torch.tensor([2, 0, 1]))
    # xent_fused writes its dense w gradient at the idx rows: called directly, it checks them itself
    x, w = torch.randn(2, 3), torch.randn(10, 3)
    for bad_idx, _, message in LABEL_POSITION_CASES[:3]:
        with pytest.raises(RuntimeError, match=re.escape(message)):
            torch.ops.proto_ce.xent_fused(x, w, bad_idx, torch.tensor([1, 0]), torch.tensor(1.0), True, True, True, True)
    # the row loops index the logits with target_pos: called directly, the kernels check its range
    one, good_pos = torch.tensor(1.0), torch.tensor([1, 0])
    for bad_pos, message in [(torch.tensor([1, 3]), "target_pos[1]=3 is outside [0, 3)"),
                             (torch.tensor([-1, 0]), "target_pos[0]=-1 is outside [0, 3)")]:
        with pytest.raises(RuntimeError, match=re.escape(message)):
            torch.ops.proto_ce.xent_fused(x, w, idx, bad_pos, one, True, True, True, True)
        with pytest.raises(RuntimeError, match=re.escape(message)):
            torch.ops.proto_ce.xent_forward(x, w, idx, bad_pos, one)
        with pytest.raises(RuntimeError, match=re.escape(message)):
            torch.ops.proto_ce.xent_backward(torch.ones(2), x, w, idx, bad_pos, one, torch.zeros(2), True, True, True)
    with pytest.raises(RuntimeError, match=re.escape("x and w must be float16/bfloat16/float32/float64")):
        torch.ops.proto_ce.xent_forward(x.long(), w.long(), idx, good_pos, one)
    _, lse = torch.ops.proto_ce.xent_forward(x, w, idx, good_pos, one)
    for grad_loss, saved_lse in [(torch.ones(1), lse), (torch.ones(2), lse[:1]), (torch.ones(2, 1), lse)]:
        with pytest.raises(RuntimeError, match=re.escape("grad_loss and lse must be 1-d with one entry per row")):
            torch.ops.proto_ce.xent_backward(grad_loss, x, w, idx, good_pos, one, saved_lse, True, True, True)


# ---------------------------------------------------------------------------------------------------
# Loader: forced reference backend, and the fallback when nothing can be compiled
# ---------------------------------------------------------------------------------------------------

def _run_python(code, env_changes, cwd):
    env = dict(os.environ, **env_changes)
    env["PYTHONPATH"] = cwd + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


CHECK_REFERENCE_BACKEND = """
    import warnings, torch, proto_ce
    assert proto_ce.backend("cpu") == "reference", proto_ce.backend("cpu")
    x = torch.nn.functional.normalize(torch.randn(5, 3, dtype=torch.float64), dim=1)
    w = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    idx, labels, s = torch.tensor([0, 2, 5, 7]), torch.tensor([2, 7, 0, 0, 5]), torch.tensor(3.0, dtype=torch.float64)
    loss = proto_ce.proto_cross_entropy(x, w, idx, labels, s)
    want = torch.nn.functional.cross_entropy(s * x @ w[idx].T, torch.tensor([1, 3, 0, 0, 2]))
    assert torch.allclose(loss, want), (loss, want)
    loss.backward()
    assert w.grad[[1, 3, 4, 6]].abs().sum() == 0
    print("OK")
"""


def test_forced_reference_backend():
    result = _run_python(CHECK_REFERENCE_BACKEND, {"PROTO_CE_BACKEND": "reference"}, REPO)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-2000:]
    assert "warn" not in result.stderr.lower(), "an explicit PROTO_CE_BACKEND=reference must not warn"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is held back only where there is no GPU")
def test_import_without_gpu_does_not_log_cuda_runtime_message(tmp_path):
    """torch.utils.cpp_extension logs "No CUDA runtime is found" on import wherever CUDA_HOME names an
    existing folder and there is no GPU; proto_ce imports it on every load, and never compiles CUDA there."""
    result = _run_python("import proto_ce; print(proto_ce.backend('cpu'))",
                         {"CUDA_HOME": str(tmp_path), "PROTO_CE_BACKEND": "auto"}, REPO)
    assert result.returncode == 0 and "extension-cpu" in result.stdout, result.stderr[-2000:]
    assert "No CUDA runtime" not in result.stderr, result.stderr[-2000:]


def test_fallback_with_warning_when_compiling_fails(tmp_path):
    """A checkout whose csrc/ differs from any prebuilt, with a compiler that always fails: the module
    ignores the stale prebuilt, cannot compile, warns once, and runs the reference."""
    shutil.copy(os.path.join(REPO, "proto_ce.py"), tmp_path / "proto_ce.py")
    shutil.copytree(os.path.join(REPO, "csrc"), tmp_path / "csrc")
    with open(tmp_path / "csrc" / "ops.cpp", "a") as f:
        f.write("\n// changed sources: no prebuilt library matches them\n")
    env = {"CXX": "/bin/false", "CC": "/bin/false", "PROTO_CE_BUILD_DIR": str(tmp_path / "build"),
           "PROTO_CE_BACKEND": "auto", "CUDA_VISIBLE_DEVICES": ""}
    result = _run_python(CHECK_REFERENCE_BACKEND, env, str(tmp_path))
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-2000:]
    assert result.stderr.count("using the pure-PyTorch reference instead") == 1, result.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU). Oracle: the float64 reference on the CPU, from the same rounded inputs.
# ---------------------------------------------------------------------------------------------------

CUDA_TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-4),  # (loss, gradients), relative
            torch.float16: (1e-2, 1e-2), torch.bfloat16: (1e-2, 3e-2)}
CUDA_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
CUDA_IDS = ["fp32", "fp16", "bf16", "fp64"]


def _float64_oracle(x, w, idx, labels, s, reduction="mean", upstream=None):
    cpu = [t.detach().cpu() for t in (x, w, idx, labels, s)]
    cpu = [t.double() if t.is_floating_point() else t for t in cpu]
    return loss_and_grads(reference_proto_cross_entropy, *cpu, reduction=reduction, upstream=upstream)


def _no_tf32():
    return torch.backends.cuda.matmul.allow_tf32 is False


@pytest.mark.cuda
def test_cuda_extension_is_loaded():
    assert proto_ce.backend("cuda") == "extension-cuda", (
        "the CUDA kernels are not loaded: is nvcc on PATH / CUDA_HOME set? Rerun `python -c 'import proto_ce'` "
        "with PROTO_CE_VERBOSE=1 to see the build log")


CUDA_PATHS = [("mean", "one-pass"), ("mean", "two-pass"), ("none", "two-pass")]


@pytest.mark.cuda
@pytest.mark.parametrize("chunks", ["auto-chunks", "small-chunks"])
@pytest.mark.parametrize("reduction,kernels", CUDA_PATHS, indirect=["kernels"], ids=[f"{r}-{k}" for r, k in CUDA_PATHS])
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=CUDA_IDS)
@pytest.mark.parametrize("shape", [SMALL, LARGE], ids=["7x13x50x17", "130x257x4099x1025"])
def test_cuda_matches_reference(shape, dtype, reduction, kernels, chunks, monkeypatch):
    assert _no_tf32(), "TF32 matmuls are on; these tolerances assume full fp32"
    if chunks == "small-chunks":
        force_small_chunks(monkeypatch, shape)
    inputs = make_inputs(**shape, dtype=dtype, device="cuda")
    upstream = None
    if reduction == "none":
        upstream = torch.rand(shape["B"], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = loss_and_grads(proto_cross_entropy, *inputs, reduction=reduction, upstream=upstream)
    want = _float64_oracle(*inputs, reduction=reduction, upstream=upstream)
    loss_tol, grad_tol = CUDA_TOL[dtype]
    assert got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got[1].dtype == dtype and got[2].dtype == dtype and got[3].dtype == inputs[4].dtype
    assert rel_err(got[0], want[0]) < loss_tol, f"loss: relative error {rel_err(got[0], want[0]):.2e}"
    for name, a, b in zip(("grad_x", "grad_w", "grad_scale"), got[1:], want[1:]):
        assert rel_err(a, b) < grad_tol, f"{name}: relative error {rel_err(a, b):.2e}"
    assert torch.count_nonzero(outside_idx_rows(got[2], inputs[2])) == 0


@pytest.mark.cuda
@needs_extension_cpu
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_cuda_matches_cpu_extension(dtype, reduction):
    cpu_inputs = make_inputs(**LARGE, dtype=dtype)
    got = loss_and_grads(proto_cross_entropy, *(t.cuda() for t in cpu_inputs), reduction=reduction)
    want = loss_and_grads(proto_cross_entropy, *cpu_inputs, reduction=reduction)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for name, a, b in zip(("loss", "grad_x", "grad_w", "grad_scale"), got, want):
        assert rel_err(a, b) < tol, f"{name}: relative error {rel_err(a, b):.2e}"


@pytest.mark.cuda
@pytest.mark.parametrize("chunks", ["auto-chunks", "small-chunks"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_bit_identical_second_run(dtype, reduction, chunks, monkeypatch):
    if chunks == "small-chunks":
        force_small_chunks(monkeypatch, LARGE)
    inputs = make_inputs(**LARGE, dtype=dtype, device="cuda")
    first = loss_and_grads(proto_cross_entropy, *inputs, reduction=reduction)
    second = loss_and_grads(proto_cross_entropy, *inputs, reduction=reduction)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.parametrize("kernels", ["one-pass", "two-pass"], indirect=True)
def test_cuda_dino_scale_shape(kernels):
    """The DINO-scale shape (B=2560, D=256, K=65536, V=16384) in bf16 spans several default-size blocks."""
    inputs = make_inputs(B=2560, D=256, K=65536, V=16384, dtype=torch.bfloat16, device="cuda")
    got = loss_and_grads(proto_cross_entropy, *inputs)
    x, w, idx, labels, s = inputs
    want = loss_and_grads(reference_proto_cross_entropy, x.float(), w.float(), idx, labels, s)
    assert rel_err(got[0], want[0]) < 1e-2
    for name, a, b in zip(("grad_x", "grad_w", "grad_scale"), got[1:], want[1:]):
        assert rel_err(a, b) < 3e-2, f"{name}: relative error {rel_err(a, b):.2e}"


@pytest.mark.cuda
def test_cuda_bad_devices():
    x, w, idx, labels, s = make_inputs(**SMALL, device="cuda")
    for bad in [dict(w=w.cpu()), dict(idx=idx.cpu()), dict(labels=labels.cpu()), dict(logit_scale=s.cpu())]:
        args = dict(x=x, w=w, idx=idx, labels=labels, logit_scale=s)
        args.update(bad)
        with pytest.raises(ValueError, match="all inputs must be on one device"):
            proto_cross_entropy(**args)


@pytest.mark.cuda
@pytest.mark.parametrize("case_id,make_bad,message", [c for c in _bad_inputs() if c[0] != "device-mismatch"],
                         ids=[c[0] for c in _bad_inputs() if c[0] != "device-mismatch"])
def test_cuda_bad_input(case_id, make_bad, message):
    bad = make_bad(*make_inputs(**SMALL))
    bad = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in bad.items()}
    with pytest.raises(ValueError) as info:
        proto_cross_entropy(**bad)
    assert message in str(info.value), str(info.value)


@pytest.mark.cuda
def test_cuda_bad_input_label_positions_direct_call():
    """torch.ops.proto_ce.label_positions on CUDA finds bad idx / labels on the device and raises RuntimeError
    with the CPU op's messages (whose formatting crashed torch 2.11 on an H100: csrc/proto_ce.h message_part)."""
    idx = torch.tensor([1, 4, 9], device="cuda")
    for bad_idx, labels, message in LABEL_POSITION_CASES:
        with pytest.raises(RuntimeError, match=re.escape(message)):
            torch.ops.proto_ce.label_positions(bad_idx.cuda(), labels.cuda(), 10)
    got = torch.ops.proto_ce.label_positions(idx, torch.tensor([9, 1, 4], device="cuda"), 10)
    assert torch.equal(got.cpu(), torch.tensor([2, 0, 1]))


CUDA_DIRECT_CALL_BAD_TARGET = """
    import torch, proto_ce
    assert proto_ce.backend("cuda") == "extension-cuda", proto_ce.backend("cuda")
    x, w = torch.randn(4, 8, device="cuda"), torch.randn(10, 8, device="cuda")
    idx, one = torch.tensor([1, 4, 9], device="cuda"), torch.ones((), device="cuda")
    target_pos = torch.tensor([0, 2, {bad}, 1], device="cuda")
    if "{op}" == "xent_fused":
        out = torch.ops.proto_ce.xent_fused(x, w, idx, target_pos, one, True, True, True, True)
    elif "{op}" == "xent_forward":
        out = torch.ops.proto_ce.xent_forward(x, w, idx, target_pos, one)
    else:
        _, lse = torch.ops.proto_ce.xent_forward(x, w, idx, target_pos.clamp(0, 2), one)
        out = torch.ops.proto_ce.xent_backward(torch.ones(4, device="cuda"), x, w, idx, target_pos, one, lse,
                                               True, True, True)
    torch.cuda.synchronize()
    print("NO ASSERT", out)
"""


@pytest.mark.cuda
@pytest.mark.parametrize("op, bad", [("xent_fused", 3), ("xent_forward", -1), ("xent_backward", 3)])
def test_cuda_bad_input_target_positions_direct_call(op, bad):
    """A direct torch.ops call with a target position outside [0, V) trips the kernels' device-side assert
    (csrc/proto_ce_cuda.cu) instead of reading out of bounds or dropping the target. The assert ends the
    CUDA context, so it runs in a child process."""
    result = _run_python(CUDA_DIRECT_CALL_BAD_TARGET.format(op=op, bad=bad), {}, REPO)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "NO ASSERT" not in output, output[-2000:]
    assert "device-side assert" in output or "target_pos[b] < V" in output, output[-2000:]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_opcheck(dtype):
    x, w, idx, labels, s = make_inputs(B=5, D=6, K=12, V=7, dtype=dtype, device="cuda")
    target_pos = torch.searchsorted(idx, labels)
    torch.library.opcheck(torch.ops.proto_ce.label_positions.default, (idx, labels, w.shape[0]))
    torch.library.opcheck(torch.ops.proto_ce.xent_forward.default,
                          (x.requires_grad_(), w.requires_grad_(), idx, target_pos, s.requires_grad_()))
    torch.library.opcheck(torch.ops.proto_ce.xent_fused.default,
                          (x, w, idx, target_pos, s, True, True, True, True))


@pytest.mark.cuda
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cuda_torch_compile_fullgraph(reduction):
    inputs = make_inputs(**LARGE, device="cuda")
    compiled = torch.compile(proto_cross_entropy, backend="aot_eager", fullgraph=True)
    got = loss_and_grads(compiled, *inputs, reduction=reduction)
    want = loss_and_grads(proto_cross_entropy, *inputs, reduction=reduction)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-6, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("kernels", ["one-pass", "two-pass"], indirect=True)
def test_cuda_peak_memory_below_quarter_of_eager(kernels):
    """Memory, not time: extra memory of fwd+bwd beyond inputs and returned gradients, op vs eager."""
    x, w, idx, labels, s = make_inputs(B=2560, D=256, K=65536, V=16384, dtype=torch.bfloat16, device="cuda")
    grad_bytes = x.numel() * x.element_size() + w.numel() * w.element_size() + 4

    def peak_extra(fn):
        xs, ws, ss = (t.detach().clone().requires_grad_() for t in (x, w, s))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(xs, ws, idx, labels, ss).backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base - grad_bytes

    op, eager = peak_extra(proto_cross_entropy), peak_extra(reference_proto_cross_entropy)
    assert op <= eager / 4, f"op {op / 2**20:.1f} MiB vs eager {eager / 2**20:.1f} MiB"
