"""The fused DINO soft-target op (proto_ce.dino_proto_loss) against a straightforward DINO loss on W[idx].

The oracle below is written the way facebookresearch/dino's DINOLoss computes it (teacher softmax of the
centred logits, student log-softmax, every student crop against every other teacher global crop, each
pair averaged over the batch, then over pairs), on logits computed from W[idx] -- independent of the op's
algebra (online log-sum-exp and probability-weighted prototype sums).
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import proto_ce

pytestmark = pytest.mark.skipif(proto_ce.backend("cpu") == "reference",
                                reason="the compiled extension is unavailable (proto_ce fell back to the reference)")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dino_loss_oracle(student, teacher, w_s, w_t, idx, center, tau_s, tau_t, n_global, n_crops):
    """DINOLoss.forward of the DINO repository, on logits over the prototype subset idx."""
    student_out = (student @ w_s[idx].T / tau_s).chunk(n_crops)
    teacher_logits = (teacher @ w_t[idx].T).detach()
    teacher_out = F.softmax((teacher_logits - center[idx]) / tau_t, dim=-1).chunk(n_global)
    total, n_terms = 0, 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue
            total = total + torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1).mean()
            n_terms += 1
    return total / n_terms, teacher_logits.sum(0)


def make_inputs(B, D, K, V, n_global, n_local, dtype=torch.float64, device="cpu", seed=0, center_scale=0.3):
    g = torch.Generator().manual_seed(seed)
    n_crops = n_global + n_local
    normal = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    student = F.normalize(normal(n_crops * B, D), dim=1)
    teacher = F.normalize(normal(n_global * B, D), dim=1)
    w_s = F.normalize(normal(K, D), dim=1)
    w_t = F.normalize(w_s + 0.3 * normal(K, D), dim=1)  # a teacher close to the student, as after EMA
    idx = torch.randperm(K, generator=g)[:V].sort().values
    center = center_scale * normal(K)
    to = lambda t: t.to(device=device, dtype=dtype)
    return dict(student=to(student), teacher=to(teacher), w_student=to(w_s), w_teacher=to(w_t),
                idx=idx.to(device), center=to(center), n_global=n_global, n_crops=n_crops)


def call(fn, inp, tau_s=0.1, tau_t=0.04):
    return fn(inp["student"], inp["teacher"], inp["w_student"], inp["w_teacher"], inp["idx"], inp["center"],
              tau_s, tau_t, inp["n_global"], inp["n_crops"])


def loss_and_grads(fn, inp, tau_s=0.1, tau_t=0.04):
    s = inp["student"].detach().clone().requires_grad_(True)
    w = inp["w_student"].detach().clone().requires_grad_(True)
    t = inp["teacher"].detach().clone().requires_grad_(True)
    wt = inp["w_teacher"].detach().clone().requires_grad_(True)
    loss, colsum = fn(s, t, w, wt, inp["idx"], inp["center"], tau_s, tau_t, inp["n_global"], inp["n_crops"])
    loss.backward()
    return loss.detach(), colsum.detach(), s.grad, w.grad, t.grad, wt.grad


# ---- values and gradients ---------------------------------------------------------------------------

@pytest.mark.parametrize("tau_t", [0.04, 0.07])
@pytest.mark.parametrize("shape", [dict(B=5, D=13, K=50, V=17), dict(B=9, D=33, K=300, V=300),
                                   dict(B=33, D=65, K=2000, V=517)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_dino_loss_on_w_idx(shape, tau_t, dtype):
    """2 global + 4 local crops: loss, centre column sums and gradients equal the oracle's."""
    inp = make_inputs(**shape, n_global=2, n_local=4, dtype=dtype)
    got = loss_and_grads(proto_ce.dino_proto_loss, inp, tau_t=tau_t)
    want = loss_and_grads(dino_loss_oracle, inp, tau_t=tau_t)
    rtol, atol = (1e-10, 1e-12) if dtype == torch.float64 else (2e-5, 2e-6)
    for name, a, b in zip(("loss", "colsum", "grad_student", "grad_w_student"), got[:4], want[:4]):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=rtol, atol=atol, msg=name)
    assert got[4] is None and got[5] is None, "the teacher and its prototypes must get no gradient"


def test_many_chunks(monkeypatch):
    """Force 7-column chunks (PROTO_CE_CHUNK_COLS) so the online log-sum-exp and U rescaling cross many
    chunk boundaries; the kernels read the variable at call time."""
    monkeypatch.setenv("PROTO_CE_CHUNK_COLS", "7")
    inp = make_inputs(B=6, D=10, K=90, V=61, n_global=2, n_local=3)
    got = loss_and_grads(proto_ce.dino_proto_loss, inp)
    want = loss_and_grads(dino_loss_oracle, inp)
    for a, b in zip(got[:4], want[:4]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n_global,n_local", [(1, 3), (2, 0), (3, 2)])
def test_other_crop_pairings(n_global, n_local):
    inp = make_inputs(B=4, D=8, K=40, V=25, n_global=n_global, n_local=n_local)
    got = loss_and_grads(proto_ce.dino_proto_loss, inp)
    want = loss_and_grads(dino_loss_oracle, inp)
    for a, b in zip(got[:4], want[:4]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_reference_matches_oracle():
    inp = make_inputs(B=5, D=13, K=50, V=17, n_global=2, n_local=4)
    got = loss_and_grads(proto_ce.reference_dino_proto_loss, inp)
    want = loss_and_grads(dino_loss_oracle, inp)
    for a, b in zip(got[:4], want[:4]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_centre_column_sums():
    """The second output is, per sampled column j, the sum over teacher rows of the raw logit T . Wt[idx_j]
    (the centre does not enter it)."""
    inp = make_inputs(B=3, D=6, K=20, V=7, n_global=2, n_local=2)
    _, colsum = call(proto_ce.dino_proto_loss, inp)
    t, wt, idx = inp["teacher"], inp["w_teacher"], inp["idx"]
    by_hand = torch.tensor([sum(float(t[r] @ wt[j]) for r in range(t.shape[0])) for j in idx.tolist()],
                           dtype=torch.float64)
    torch.testing.assert_close(colsum, by_hand, rtol=1e-12, atol=1e-12)
    inp["center"] = inp["center"] + 5.0
    torch.testing.assert_close(call(proto_ce.dino_proto_loss, inp)[1], by_hand, rtol=1e-12, atol=1e-12)
    assert not colsum.requires_grad


def test_zero_gradient_outside_idx_and_no_teacher_gradient():
    inp = make_inputs(B=4, D=8, K=30, V=9, n_global=2, n_local=2)
    _, _, grad_s, grad_w, grad_t, grad_wt = loss_and_grads(proto_ce.dino_proto_loss, inp)
    outside = torch.ones(30, dtype=torch.bool)
    outside[inp["idx"]] = False
    assert torch.count_nonzero(grad_w[outside]) == 0
    assert torch.count_nonzero(grad_w[inp["idx"]]) > 0 and torch.count_nonzero(grad_s) > 0
    assert grad_t is None and grad_wt is None


def test_centre_gets_no_gradient():
    inp = make_inputs(B=3, D=5, K=12, V=6, n_global=2, n_local=1)
    center = inp["center"].clone().requires_grad_(True)
    s = inp["student"].clone().requires_grad_(True)
    loss, _ = proto_ce.dino_proto_loss(s, inp["teacher"], inp["w_student"], inp["w_teacher"], inp["idx"], center,
                                       0.1, 0.04, 2, 3)
    loss.backward()
    assert center.grad is None and s.grad is not None


def test_gradcheck_float64():
    inp = make_inputs(B=2, D=4, K=9, V=5, n_global=2, n_local=2)
    s = inp["student"].clone().requires_grad_(True)
    w = inp["w_student"].clone().requires_grad_(True)
    f = lambda s, w: proto_ce.dino_proto_loss(s, inp["teacher"], w, inp["w_teacher"], inp["idx"], inp["center"],
                                              0.1, 0.07, 2, 4)[0]
    assert torch.autograd.gradcheck(f, (s, w), eps=1e-6, atol=1e-7)


def test_opcheck():
    inp = make_inputs(B=3, D=5, K=11, V=6, n_global=2, n_local=2)
    s = inp["student"].clone().requires_grad_(True)
    w = inp["w_student"].clone().requires_grad_(True)
    args = (s, inp["teacher"], w, inp["w_teacher"], inp["idx"], inp["center"], 0.1, 0.04, 2)
    torch.library.opcheck(torch.ops.proto_ce.dino_forward.default, args)


def test_torch_compile():
    inp = make_inputs(B=3, D=5, K=11, V=6, n_global=2, n_local=2, dtype=torch.float32)
    compiled = torch.compile(proto_ce.dino_proto_loss, backend="aot_eager", fullgraph=True)
    got = loss_and_grads(compiled, inp)
    want = loss_and_grads(proto_ce.dino_proto_loss, inp)
    for a, b in zip(got[:4], want[:4]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_autocast_leaves_the_op_unchanged(device):
    """Inside torch.autocast the op computes in its inputs' dtype, exactly as outside."""
    inp = make_inputs(B=6, D=24, K=200, V=70, n_global=2, n_local=3, dtype=torch.float32, device=device)
    want = loss_and_grads(proto_ce.dino_proto_loss, inp)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        got = loss_and_grads(proto_ce.dino_proto_loss, inp)
    for a, b in zip(got[:4], want[:4]):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_bit_identical_second_run():
    inp = make_inputs(B=40, D=64, K=3000, V=1500, n_global=2, n_local=4, dtype=torch.float32)
    first = loss_and_grads(proto_ce.dino_proto_loss, inp)
    second = loss_and_grads(proto_ce.dino_proto_loss, inp)
    for a, b in zip(first[:4], second[:4]):
        assert torch.equal(a, b)


def test_half_inputs_accumulate_in_float32():
    """The CPU kernels also take bfloat16 (accumulating in float32); the loss comes back in float32."""
    inp = make_inputs(B=4, D=16, K=64, V=32, n_global=2, n_local=2, dtype=torch.bfloat16)
    loss, colsum = call(proto_ce.dino_proto_loss, inp)
    assert loss.dtype == torch.float32 and colsum.dtype == torch.float32
    want, _ = dino_loss_oracle(*(inp[k].float() if inp[k].is_floating_point() else inp[k] for k in
                                 ("student", "teacher", "w_student", "w_teacher", "idx", "center")),
                               0.1, 0.04, 2, 4)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)


# ---- bad input -----------------------------------------------------------------------------------------

def _bad(**change):
    inp = make_inputs(B=3, D=4, K=10, V=5, n_global=2, n_local=2)
    args = dict(student=inp["student"], teacher=inp["teacher"], w_student=inp["w_student"],
                w_teacher=inp["w_teacher"], idx=inp["idx"], center=inp["center"], tau_s=0.1, tau_t=0.04,
                n_global=2, n_crops=4)
    args.update(change)
    return args


BAD_INPUTS = {
    "student 1-d": (dict(student=torch.zeros(12, dtype=torch.float64)), "student must be 2-d"),
    "teacher D": (dict(teacher=torch.zeros(6, 5, dtype=torch.float64)), "D="),
    "w_teacher shape": (dict(w_teacher=torch.zeros(11, 4, dtype=torch.float64)), "w_teacher has shape"),
    "center length": (dict(center=torch.zeros(9, dtype=torch.float64)), "center has shape (9,)"),
    "dtype mismatch": (dict(teacher=torch.zeros(6, 4, dtype=torch.float32)), "teacher is torch.float32"),
    "integer student": (dict(student=torch.zeros(12, 4, dtype=torch.int64)), "float16/bfloat16/float32/float64"),
    "idx dtype": (dict(idx=torch.tensor([0, 1, 2], dtype=torch.int32)), "int64"),
    "idx 2-d": (dict(idx=torch.tensor([[0, 1]])), "idx must be a 1-d int64"),
    "idx unsorted": (dict(idx=torch.tensor([0, 3, 2])), "not sorted"),
    "idx duplicate": (dict(idx=torch.tensor([0, 2, 2])), "duplicate"),
    "idx negative": (dict(idx=torch.tensor([-1, 2])), "outside [0, 10)"),
    "idx too large": (dict(idx=torch.tensor([2, 10])), "outside [0, 10)"),
    "idx empty": (dict(idx=torch.zeros(0, dtype=torch.int64)), "idx is empty"),
    "teacher rows vs n_global": (dict(n_global=4), "not a multiple of n_global=4"),
    "student rows vs n_crops": (dict(n_crops=3), "student has 12 rows, expected n_crops*B"),
    "n_crops < n_global": (dict(n_global=3, n_crops=2, teacher=torch.zeros(9, 4, dtype=torch.float64),
                                student=torch.zeros(6, 4, dtype=torch.float64)), "n_crops=2 < n_global=3"),
    "no pair": (dict(n_global=1, n_crops=1, teacher=torch.zeros(3, 4, dtype=torch.float64),
                     student=torch.zeros(3, 4, dtype=torch.float64)), "no (student, teacher) pair"),
    "n_global float": (dict(n_global=2.0), "n_global must be a positive int"),
    "tau_s zero": (dict(tau_s=0.0), "tau_s must be a positive"),
    "tau_t negative": (dict(tau_t=-0.04), "tau_t must be a positive"),
    "tau_t nan": (dict(tau_t=float("nan")), "tau_t must be a positive"),
    "empty batch": (dict(teacher=torch.zeros(0, 4, dtype=torch.float64), student=torch.zeros(0, 4, dtype=torch.float64)),
                    "empty batch"),
    "not a tensor": (dict(center=[0.0] * 10), "center must be a torch.Tensor"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
@pytest.mark.parametrize("fn", ["dino_proto_loss", "reference_dino_proto_loss"])
def test_bad_input_one_line_value_error(case, fn):
    change, message = BAD_INPUTS[case]
    with pytest.raises(ValueError) as err:
        getattr(proto_ce, fn)(**_bad(**change))
    assert message in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.cuda
@pytest.mark.parametrize("case", ["idx unsorted", "idx duplicate", "idx negative", "idx too large", "tau_s zero",
                                  "teacher rows vs n_global"])
def test_cuda_bad_input(case):
    """The CUDA kernels' own checks (the idx scan runs in the op, not in Python) raise the same errors."""
    change, message = BAD_INPUTS[case]
    args = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in _bad(**change).items()}
    with pytest.raises(ValueError) as err:
        proto_ce.dino_proto_loss(**args)
    assert message in str(err.value), str(err.value)


def test_device_mismatch_is_rejected():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device to mismatch with")
    with pytest.raises(ValueError, match="on cuda"):
        proto_ce.dino_proto_loss(**_bad(center=torch.zeros(10, dtype=torch.float64, device="cuda")))


# ---- CUDA ------------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float32, 1e-4, 1e-5), (torch.float64, 1e-10, 1e-12),
                                             (torch.bfloat16, 2e-2, 1e-2), (torch.float16, 5e-3, 2e-3)])
@pytest.mark.parametrize("shape", [dict(B=5, D=13, K=50, V=17), dict(B=64, D=256, K=8192, V=4099)])
def test_cuda_matches_float64_oracle(shape, dtype, rtol, atol):
    """CUDA op on fp32/fp64/bf16/fp16 inputs vs the float64 oracle on the same (rounded) inputs, errors relative
    to each output's largest entry. For fp16/bf16 the kernels cast probabilities to the input dtype for the
    gradient GEMMs (fp32 accumulation); a CPU emulation of exactly that arithmetic gave normalised errors up
    to 1.8e-3 (bf16) and 2.7e-4 (fp16) on these shapes, hence the tolerances."""
    assert proto_ce.backend("cuda") == "extension-cuda"
    inp = make_inputs(**shape, n_global=2, n_local=4, dtype=dtype, device="cuda")
    got = loss_and_grads(proto_ce.dino_proto_loss, inp)
    exact = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in inp.items()}
    want = loss_and_grads(dino_loss_oracle, exact)
    for name, a, b in zip(("loss", "colsum", "grad_student", "grad_w_student"), got[:4], want[:4]):
        scale = b.abs().max().clamp_min(1e-30)
        torch.testing.assert_close(a.double() / scale, b / scale, rtol=rtol, atol=atol, msg=name)
    assert got[4] is None and got[5] is None


@pytest.mark.cuda
def test_cuda_matches_cpu_extension():
    inp = make_inputs(B=48, D=96, K=5000, V=3001, n_global=2, n_local=6, dtype=torch.float32)
    on_gpu = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
    cpu = loss_and_grads(proto_ce.dino_proto_loss, inp)
    gpu = loss_and_grads(proto_ce.dino_proto_loss, on_gpu)
    for a, b in zip(gpu[:4], cpu[:4]):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
def test_cuda_bit_identical_second_run():
    inp = make_inputs(B=128, D=256, K=16384, V=8192, n_global=2, n_local=8, dtype=torch.float32, device="cuda")
    first = loss_and_grads(proto_ce.dino_proto_loss, inp)
    second = loss_and_grads(proto_ce.dino_proto_loss, inp)
    for a, b in zip(first[:4], second[:4]):
        assert torch.equal(a, b)


@pytest.mark.cuda
def test_cuda_zero_gradient_outside_idx_and_opcheck():
    inp = make_inputs(B=4, D=8, K=30, V=9, n_global=2, n_local=2, dtype=torch.float32, device="cuda")
    _, _, _, grad_w, grad_t, grad_wt = loss_and_grads(proto_ce.dino_proto_loss, inp)
    outside = torch.ones(30, dtype=torch.bool, device="cuda")
    outside[inp["idx"]] = False
    assert torch.count_nonzero(grad_w[outside]) == 0 and grad_t is None and grad_wt is None
    s = inp["student"].clone().requires_grad_(True)
    args = (s, inp["teacher"], inp["w_student"], inp["w_teacher"], inp["idx"], inp["center"], 0.1, 0.04, 2)
    torch.library.opcheck(torch.ops.proto_ce.dino_forward.default, args)


@pytest.mark.cuda
def test_cuda_many_chunks_subprocess():
    """PROTO_CE_CHUNK_COLS=100 on the GPU (many chunks, a ragged last one), in a fresh process."""
    code = ("import torch, sys; sys.path.insert(0, 'tests'); import test_dino_op as t, proto_ce;"
            "inp = t.make_inputs(B=16, D=32, K=2000, V=1234, n_global=2, n_local=4, device='cuda');"
            "got = t.loss_and_grads(proto_ce.dino_proto_loss, inp);"
            "want = t.loss_and_grads(t.dino_loss_oracle, inp);"
            "[torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11) for a, b in zip(got[:4], want[:4])]")
    env = dict(os.environ, PROTO_CE_CHUNK_COLS="100")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True)


@pytest.mark.cuda
def test_cuda_never_holds_rows_by_v():
    """fwd+bwd at 1280 student rows x V = 65536: the peak extra GPU memory stays far below one fp32
    [rows, V] block (335 MB), which an implementation materialising the logits could not do."""
    inp = make_inputs(B=128, D=64, K=65536, V=65536, n_global=2, n_local=8, dtype=torch.float32, device="cuda")
    rows_by_v = inp["student"].shape[0] * 65536 * 4
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss_and_grads(proto_ce.dino_proto_loss, inp)
    torch.cuda.synchronize()
    peak_extra = torch.cuda.max_memory_allocated() - base
    assert peak_extra < rows_by_v / 3, f"peak extra {peak_extra / 2**20:.0f} MiB vs [rows, V] {rows_by_v / 2**20:.0f} MiB"
