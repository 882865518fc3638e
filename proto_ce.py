"""Cross-entropy over a subset of class prototypes, fused: the one Python face of csrc/.

    proto_cross_entropy(x, w, idx, labels, logit_scale)
        == F.cross_entropy(logit_scale * x @ w[idx].T, position of each label in idx)

This is the loss of vocabulary subsampling (Wen et al., NeurIPS 2024, Sec. 3.3 and 4.1): each iteration
scores the batch only against a sampled subset `idx` of the K class prototypes `w` (the classes of the
batch plus random others), which is what makes supervised learning behave like CLIP's per-batch text
vocabulary. The fused op never builds the [B, K] logits, and its kernels never hold [B, V] either: V is
processed in blocks (CPU: csrc/proto_ce_cpu.cpp, CUDA: csrc/proto_ce_cuda.cu). Two kernel families:
  one pass (reduction "mean" / "sum", op xent_fused): row blocks of x meet all V gathered prototypes, the
    log-sum-exp of each row is exact, and the gradients (for an upstream gradient of 1) are computed in
    the same pass; the backward pass only scales them (its formula is in C++, csrc/proto_ce_autograd.cpp,
    so that a step runs no Python beyond this module's checks). Three matmuls, like eager forward +
    backward.
  two passes (reduction "none", ops xent_forward / xent_backward): chunks of prototype columns with an
    online log-sum-exp; the backward pass recomputes each chunk's logits from the saved log-sum-exp.

Inputs: x [B, D] (l2-normalised by the caller), w [K, D] (same dtype and device), idx [V] int64 sorted
unique class ids, labels [B] int64 ORIGINAL class ids (each must be in idx), logit_scale a 0-d floating
tensor (already exp'd / clamped by the caller). Gradients flow to x, to the idx rows of w (all other rows
get exactly zero) and to logit_scale. The loss is returned in float32 for float32/float16/bfloat16 inputs
and in float64 for float64 inputs. Bad input raises a one-line ValueError naming the problem.

The module also carries the soft-target op of DINO with prototype subsampling (Sec. 4.2), issue 8:
dino_proto_loss / reference_dino_proto_loss (section "DINO soft-target loss" below; kernels
csrc/dino_ce_cpu.cpp and csrc/dino_ce_cuda.cu, same loader, same backends).

Backends, chosen once at import:
  1. a prebuilt extension `_proto_ce_ext` (``pip install --no-build-isolation .`` or
     ``python setup.py build_ext --inplace``), if it was built from the current csrc/ sources and, where a
     GPU is visible and nvcc is available, has the CUDA kernels;
  2. otherwise a JIT build of csrc/ with torch.utils.cpp_extension (ninja), cached (see below); the CUDA
     sources are compiled too when torch.cuda.is_available() and nvcc is found;
  3. otherwise the pure-PyTorch reference `reference_proto_cross_entropy`, with one warning.
`backend()` says which one a device uses: "extension-cpu", "extension-cuda" or "reference".

Environment variables:
  PROTO_CE_BACKEND   auto (default) | extension (fail instead of falling back) | reference (never load
                     the extension)
  PROTO_CE_BUILD_DIR where JIT builds are cached; default $TORCH_EXTENSIONS_DIR/clip-beyond-tail if
                     TORCH_EXTENSIONS_DIR is set, else ~/.cache/clip-beyond-tail/ext. Each build lives in a
                     folder named after a hash of the sources, torch/CUDA/Python versions and flags, so a
                     changed source never reuses a stale build.
  PROTO_CE_VERBOSE=1 show the compiler output of a JIT build
  PROTO_CE_TWO_PASS=1 compute mean / sum losses with the two-pass kernels too (see above)
  PROTO_CE_CHUNK_COLS=n, PROTO_CE_CHUNK_ROWS=n  force the chunk sizes of the kernels (tests and tuning)
  MAX_JOBS, TORCH_CUDA_ARCH_LIST, CUDA_HOME are honoured as by torch.utils.cpp_extension.
Several processes importing this module at once (torchrun) share one build: torch's file lock in the
build folder lets one compile while the others wait, and a finished build is loaded without rebuilding.
"""
import functools
import glob
import hashlib
import importlib
import importlib.util
import os
import re
import sys
import time
import warnings

import torch
import torch.nn.functional as F

__all__ = ["proto_cross_entropy", "reference_proto_cross_entropy", "backend", "dino_proto_loss",
           "reference_dino_proto_loss"]

_HERE = os.path.dirname(os.path.abspath(__file__))
_CSRC = os.path.join(_HERE, "csrc")
_PREBUILT = "_proto_ce_ext"
_REDUCTIONS = ("mean", "sum", "none")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------

def _value_errors(fn):
    """Raise the kernels' own input errors as the ValueError the public functions document.

    The C++ checks raise RuntimeError (TORCH_CHECK, with messages built without streams: see message_part in
    csrc/proto_ce.h for the crash that avoids). Under torch.compile the errors stay RuntimeError (the wrapper
    steps aside, so tracing sees no try block).
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        try:
            return fn(*args, **kwargs)
        except RuntimeError as e:
            message = (str(e).strip().splitlines() or [""])[0]
            if message.startswith("proto_ce:"):
                raise ValueError(message) from None
            raise
    return wrapper


@_value_errors
def proto_cross_entropy(x, w, idx, labels, logit_scale, reduction="mean"):
    """Cross-entropy of `logit_scale * x @ w[idx].T` against the positions of `labels` in `idx`.

    x [B, D], w [K, D], idx [V] int64 sorted unique, labels [B] int64 class ids (all in idx), logit_scale
    0-d. reduction: "mean" | "sum" | "none" (per-sample losses [B]). Uses the compiled kernels where
    available (see backend()), else the reference. torch.autocast does not change the kernels: they
    compute in x's dtype (fp16 / bf16 accumulated in float32), inside an autocast region as outside.
    """
    _check_inputs(x, w, idx, labels, logit_scale, reduction)
    if not _extension_handles(x.device):
        return reference_proto_cross_entropy(x, w, idx, labels, logit_scale, reduction)
    target_pos = torch.ops.proto_ce.label_positions(idx, labels, w.shape[0])
    if reduction != "none" and _LOADED.one_pass and (x.device.type, "xent_fused") in _LOADED.kernels:
        # One pass: the kernel returns the gradients for an upstream gradient of 1 with the loss.
        grad_on = torch.is_grad_enabled()
        loss, _, _, _ = torch.ops.proto_ce.xent_fused(
            x, w, idx, target_pos, logit_scale, reduction == "mean", grad_on and x.requires_grad,
            grad_on and w.requires_grad, grad_on and logit_scale.requires_grad)
        return loss
    loss, _ = torch.ops.proto_ce.xent_forward(x, w, idx, target_pos, logit_scale)
    return _reduce(loss, reduction)


def reference_proto_cross_entropy(x, w, idx, labels, logit_scale, reduction="mean"):
    """The same loss in plain PyTorch (materialises [B, V]); the tests' oracle and the fallback."""
    _check_inputs(x, w, idx, labels, logit_scale, reduction)
    target_pos = _label_positions_reference(idx, labels, w.shape[0])
    return reference_loss_from_positions(x, w, idx, target_pos, logit_scale, reduction)


def reference_loss_from_positions(x, w, idx, target_pos, logit_scale, reduction="mean"):
    """The eager computation itself, with target positions already known and no input checks.

    The matmul runs in the input dtype and the cross-entropy in float32 (float64 for float64 inputs),
    as under autocast. The benchmark uses this as the eager / torch.compile baseline.
    """
    acc = _acc_dtype(x.dtype)
    logits = logit_scale.to(acc) * (x @ w.index_select(0, idx).T).to(acc)
    return F.cross_entropy(logits, target_pos, reduction=reduction)


def backend(device=None):
    """Which implementation proto_cross_entropy uses for tensors on `device`.

    "extension-cpu", "extension-cuda" or "reference". device defaults to "cuda" when a GPU is
    available, else "cpu".
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return f"extension-{device.type}" if _extension_handles(device) else "reference"


# ---------------------------------------------------------------------------------------------------
# Input checks (shared by the op and the reference; one-line ValueErrors)
# ---------------------------------------------------------------------------------------------------

def _check_inputs(x, w, idx, labels, logit_scale, reduction):
    names = ("x", "w", "idx", "labels", "logit_scale")
    tensors = (x, w, idx, labels, logit_scale)
    for name, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"proto_ce: {name} must be a torch.Tensor, got {type(t).__name__}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"proto_ce: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if x.dim() != 2:
        raise ValueError(f"proto_ce: x must be 2-d [B, D], got shape {tuple(x.shape)}")
    if w.dim() != 2:
        raise ValueError(f"proto_ce: w must be 2-d [K, D], got shape {tuple(w.shape)}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"proto_ce: x has D={x.shape[1]} but w has D={w.shape[1]}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"proto_ce: x must be float16/bfloat16/float32/float64, got {x.dtype}")
    if w.dtype != x.dtype:
        raise ValueError(f"proto_ce: x is {x.dtype} but w is {w.dtype}; cast both to one dtype")
    if idx.dim() != 1 or idx.dtype != torch.int64:
        raise ValueError(f"proto_ce: idx must be a 1-d int64 tensor, got {idx.dim()}-d {idx.dtype}")
    if labels.dim() != 1 or labels.dtype != torch.int64:
        raise ValueError(f"proto_ce: labels must be a 1-d int64 tensor, got {labels.dim()}-d {labels.dtype}")
    if labels.shape[0] != x.shape[0]:
        raise ValueError(f"proto_ce: labels has {labels.shape[0]} entries but x has B={x.shape[0]} rows")
    if logit_scale.dim() != 0:
        raise ValueError(f"proto_ce: logit_scale must be a 0-d tensor, got shape {tuple(logit_scale.shape)}")
    if not logit_scale.is_floating_point():
        raise ValueError(f"proto_ce: logit_scale must be a floating tensor, got {logit_scale.dtype}")
    if any(t.device != x.device for t in tensors):
        where = ", ".join(f"{n} on {t.device}" for n, t in zip(names, tensors))
        raise ValueError(f"proto_ce: all inputs must be on one device, got {where}")
    if x.shape[0] == 0:
        raise ValueError("proto_ce: empty batch (B == 0)")
    if x.shape[1] == 0:
        raise ValueError("proto_ce: x and w have no features (D == 0)")
    if idx.shape[0] == 0:
        raise ValueError("proto_ce: idx is empty (V == 0); sample at least one prototype")


def _check_sorted_unique_ids(idx, limit, kind, rows_note):
    """idx values in [0, limit), strictly increasing; the C++ ops' messages (kind: 'class' or 'prototype')."""
    bad = (idx < 0) | (idx >= limit)
    if bool(bad.any()):
        raise ValueError(f"proto_ce: idx contains {kind} id {int(idx[bad][0])} outside [0, {limit}) ({rows_note})")
    step = idx[1:] - idx[:-1]
    if bool((step == 0).any()):
        i = int((step == 0).nonzero()[0]) + 1
        raise ValueError(f"proto_ce: idx contains duplicate {kind} id {int(idx[i])} (idx must be sorted and unique)")
    if bool((step < 0).any()):
        i = int((step < 0).nonzero()[0]) + 1
        raise ValueError(f"proto_ce: idx is not sorted (idx[{i - 1}]={int(idx[i - 1])} > idx[{i}]={int(idx[i])}); "
                         "use torch.sort or torch.unique")


def _label_positions_reference(idx, labels, num_classes):
    """Positions of labels in idx, with the checks of the C++ op (label_positions) in plain PyTorch."""
    _check_sorted_unique_ids(idx, num_classes, "class", f"w has {num_classes} rows")
    pos = torch.searchsorted(idx, labels)
    found = idx[pos.clamp(max=idx.shape[0] - 1)] == labels
    if not bool(found.all()):
        b = int((~found).nonzero()[0])
        raise ValueError(f"proto_ce: labels contain class id {int(labels[b])} (labels[{b}]) which is not in idx; "
                         "every label must be a sampled class")
    return pos


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _reduce(loss, reduction):
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


# ---------------------------------------------------------------------------------------------------
# Python side of the torch.library registration: fake (meta) kernels and autograd formulas
# ---------------------------------------------------------------------------------------------------

def _register_python_side():
    @torch.library.register_fake("proto_ce::label_positions")
    def _label_positions_fake(idx, labels, num_classes):
        return labels.new_empty(labels.shape)

    @torch.library.register_fake("proto_ce::xent_forward")
    def _xent_forward_fake(x, w, idx, target_pos, scale):
        acc = _acc_dtype(x.dtype)
        return x.new_empty((x.shape[0],), dtype=acc), x.new_empty((x.shape[0],), dtype=acc)

    @torch.library.register_fake("proto_ce::xent_backward")
    def _xent_backward_fake(grad_loss, x, w, idx, target_pos, scale, lse, need_x, need_w, need_scale):
        return (x.new_empty(x.shape) if need_x else x.new_empty((0,)),
                w.new_empty(w.shape) if need_w else w.new_empty((0,)),
                scale.new_empty(()) if need_scale else scale.new_empty((0,)))

    def setup_context(ctx, inputs, output):
        x, w, idx, target_pos, scale = inputs
        _, lse = output
        ctx.save_for_backward(x, w, idx, target_pos, scale, lse)
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)  # no zero-filled gradient for the unused lse output

    def backward(ctx, grad_loss, _grad_lse):
        x, w, idx, target_pos, scale, lse = ctx.saved_tensors
        if grad_loss is None:  # (grads are not materialised) only lse was used: no gradient
            return None, None, None, None, None
        need_x, need_w, _, _, need_scale = ctx.needs_input_grad
        grad_x, grad_w, grad_scale = torch.ops.proto_ce.xent_backward(
            grad_loss, x, w, idx, target_pos, scale, lse, need_x, need_w, need_scale)
        return (grad_x if need_x else None, grad_w if need_w else None, None, None,
                grad_scale if need_scale else None)

    torch.library.register_autograd("proto_ce::xent_forward", backward, setup_context=setup_context)

    @torch.library.register_fake("proto_ce::xent_fused")
    def _xent_fused_fake(x, w, idx, target_pos, scale, mean, need_x, need_w, need_scale):
        acc = _acc_dtype(x.dtype)
        return (x.new_empty((), dtype=acc),
                x.new_empty(x.shape if need_x else (0,), dtype=acc),
                w.new_empty(w.shape if need_w else (0,)),
                x.new_empty(() if need_scale else (0,), dtype=acc))

    # xent_fused's autograd formula is registered in C++ (csrc/proto_ce_autograd.cpp): it runs on every
    # training step of the mean / sum loss, where a formula registered from here added about 0.1 ms of
    # Python per step, as much as eager's whole loss at small shapes.


# ---------------------------------------------------------------------------------------------------
# DINO soft-target loss over a prototype subset (issue 8; Sec. 4.2 prototype subsampling)
# ---------------------------------------------------------------------------------------------------
# DINO scores l2-normalised embeddings against K weight-normalised prototypes; Sec. 4.2 draws a uniform
# subset idx [V] of them each iteration, the same for teacher and student. The fused op computes DINO's
# loss over those V columns without building [rows, K] (the CUDA kernels not [rows, V] either): per student
# row one online log-sum-exp over V, plus the dot of its logits with the mixture of its paired teachers'
# probabilities, which is S_r . (sum_g U_g) with U_g = sum_j p_gj w_student[idx_j] (csrc/dino_ce_cpu.cpp
# derives it). Kernels: csrc/dino_ce_cpu.cpp, csrc/dino_ce_cuda.cu.

@_value_errors
def dino_proto_loss(student, teacher, w_student, w_teacher, idx, center, tau_s, tau_t, n_global, n_crops):
    """DINO's self-distillation loss over the prototype columns idx, and the teacher's logit column sums.

    student [n_crops*B, D]: embeddings of every crop, crop-major (row c*B+b = crop c of image b; the first
    n_global crops are the global ones); teacher [n_global*B, D]: embeddings of the global crops, same
    order; w_student, w_teacher [K, D]: prototypes (l2-normalised by the caller, as DINO's weight-normalised
    last layer); idx [V] int64 sorted unique; center [K] (only center[idx] is read); tau_s, tau_t > 0;
    n_global, n_crops ints. With s = student @ w_student[idx].T / tau_s and
    p = softmax((teacher @ w_teacher[idx].T - center[idx]) / tau_t), the loss is the mean over images and
    over the (student crop v, teacher global crop g != v) pairs of -sum_j p[g, j] log_softmax(s[v])_j --
    facebookresearch/dino's DINOLoss on those V columns.

    Returns (loss 0-d, teacher_logit_colsum [V]): the second is sum over teacher rows of the raw logits
    teacher @ w_teacher[idx].T, for DINO's centre update (an EMA of their batch mean; with subsampling only
    center[idx] moves). Both in float32 (float64 for float64 inputs). Gradients flow to student and to the
    idx rows of w_student (other rows get exactly zero); the teacher side (teacher, w_teacher, center) gets
    none, as DINO stops it. Bad input raises a one-line ValueError.
    """
    _check_dino_inputs(student, teacher, w_student, w_teacher, idx, center, tau_s, tau_t, n_global, n_crops)
    if student.device.type not in _DINO_KERNELS:
        _check_dino_idx(idx, w_student.shape[0])
        return reference_dino_loss_eager(student, teacher, w_student, w_teacher, idx, center, tau_s, tau_t,
                                         n_global, n_crops)
    loss, colsum, _, _, _ = torch.ops.proto_ce.dino_forward(student, teacher.detach(), w_student,
                                                            w_teacher.detach(), idx, center.detach(),
                                                            float(tau_s), float(tau_t), int(n_global))
    return loss, colsum.detach()


def reference_dino_proto_loss(student, teacher, w_student, w_teacher, idx, center, tau_s, tau_t, n_global,
                              n_crops):
    """The same in plain PyTorch (materialises [rows, V]); the tests' second oracle and the fallback."""
    _check_dino_inputs(student, teacher, w_student, w_teacher, idx, center, tau_s, tau_t, n_global, n_crops)
    _check_dino_idx(idx, w_student.shape[0])
    return reference_dino_loss_eager(student, teacher, w_student, w_teacher, idx, center, tau_s, tau_t, n_global,
                                     n_crops)


def reference_dino_loss_eager(student, teacher, w_student, w_teacher, idx, center, tau_s, tau_t, n_global,
                              n_crops):
    """The eager computation itself, without input checks: matmuls in the input dtype, softmax and
    cross-entropy in float32 (float64 for float64 inputs), as under autocast. The benchmark's baseline."""
    acc = _acc_dtype(student.dtype)
    log_p = F.log_softmax((student @ w_student.index_select(0, idx).T).to(acc) / tau_s, dim=-1)
    with torch.no_grad():
        t = (teacher @ w_teacher.index_select(0, idx).T).to(acc)
        p = F.softmax((t - center.index_select(0, idx).to(acc)) / tau_t, dim=-1)
    B = teacher.shape[0] // n_global
    total = 0
    for g in range(n_global):
        for v in range(n_crops):
            if v != g:
                total = total - (p[g * B:(g + 1) * B] * log_p[v * B:(v + 1) * B]).sum(-1).mean()
    return total / (n_global * n_crops - n_global), t.sum(0)


def _check_dino_inputs(student, teacher, w_student, w_teacher, idx, center, tau_s, tau_t, n_global, n_crops):
    """Shapes, dtypes, devices and the scalar arguments: no data-dependent branch, so torch.compile can trace
    through it; the values of idx are checked by the op (or by _check_dino_idx on the reference path)."""
    names = ("student", "teacher", "w_student", "w_teacher", "idx", "center")
    tensors = (student, teacher, w_student, w_teacher, idx, center)
    for name, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"proto_ce: {name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in zip(names[:4], tensors[:4]):
        if t.dim() != 2:
            raise ValueError(f"proto_ce: {name} must be 2-d, got shape {tuple(t.shape)}")
    if student.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"proto_ce: student must be float16/bfloat16/float32/float64, got {student.dtype}")
    for name, t in zip(names[1:4] + ("center",), (teacher, w_student, w_teacher, center)):
        if t.dtype != student.dtype:
            raise ValueError(f"proto_ce: {name} is {t.dtype} but student is {student.dtype}; cast them to one dtype")
    K, D = w_student.shape
    if tuple(w_teacher.shape) != (K, D):
        raise ValueError(f"proto_ce: w_teacher has shape {tuple(w_teacher.shape)} but w_student has {(K, D)}")
    if student.shape[1] != D or teacher.shape[1] != D:
        raise ValueError(f"proto_ce: student and teacher have D={student.shape[1]} and D={teacher.shape[1]}, "
                         f"the prototypes D={D}")
    if D == 0:
        raise ValueError("proto_ce: the embeddings have no features (D == 0)")
    if center.dim() != 1 or center.shape[0] != K:
        raise ValueError(f"proto_ce: center has shape {tuple(center.shape)}, expected [K] = [{K}]")
    if idx.dim() != 1 or idx.dtype != torch.int64:
        raise ValueError(f"proto_ce: idx must be a 1-d int64 tensor, got {idx.dim()}-d {idx.dtype}")
    if any(t.device != student.device for t in tensors):
        where = ", ".join(f"{n} on {t.device}" for n, t in zip(names, tensors))
        raise ValueError(f"proto_ce: all inputs must be on one device, got {where}")
    for name, value in (("tau_s", tau_s), ("tau_t", tau_t)):
        if isinstance(value, (bool, torch.Tensor)) or not isinstance(value, (int, float)) or not value > 0 \
                or value == float("inf"):
            raise ValueError(f"proto_ce: {name} must be a positive finite number, got {value!r}")
    for name, value in (("n_global", n_global), ("n_crops", n_crops)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"proto_ce: {name} must be a positive int, got {value!r}")
    if n_crops < n_global:
        raise ValueError(f"proto_ce: n_crops={n_crops} < n_global={n_global}; the student sees every crop, the "
                         "global ones included")
    if n_crops == n_global == 1:
        raise ValueError("proto_ce: n_global = n_crops = 1 leaves no (student, teacher) pair of different views")
    if teacher.shape[0] == 0 or student.shape[0] == 0:
        raise ValueError("proto_ce: empty batch (no teacher or student rows)")
    if teacher.shape[0] % n_global:
        raise ValueError(f"proto_ce: teacher has {teacher.shape[0]} rows, not a multiple of n_global={n_global}")
    B = teacher.shape[0] // n_global
    if student.shape[0] != n_crops * B:
        raise ValueError(f"proto_ce: student has {student.shape[0]} rows, expected n_crops*B = {n_crops}*{B} = "
                         f"{n_crops * B} (B = teacher rows / n_global)")


def _check_dino_idx(idx, num_prototypes):
    """The values of idx (range, sorted, unique), as the C++ op checks them (csrc/dino_ce_cpu.cpp check_idx)."""
    if idx.shape[0] == 0:
        raise ValueError("proto_ce: idx is empty (V == 0); sample at least one prototype")
    _check_sorted_unique_ids(idx, num_prototypes, "prototype", f"the prototypes have {num_prototypes} rows")


_DINO_KERNELS = set()  # device types with compiled dino_forward kernels (filled at import by the loader)


def _register_dino_python_side():
    """Fake kernels and autograd of dino_forward / dino_backward; called by _initialise once csrc/ is loaded."""
    for device in ("cpu", "cuda"):
        try:
            if torch._C._dispatch_has_kernel_for_dispatch_key("proto_ce::dino_forward", device.upper()):
                _DINO_KERNELS.add(device)
        except RuntimeError:  # a library built without csrc/dino_ce_*: the reference serves dino_proto_loss
            return
    @torch.library.register_fake("proto_ce::dino_forward")
    def _dino_forward_fake(student, teacher, w_student, w_teacher, idx, center, tau_s, tau_t, n_global):
        acc = _acc_dtype(student.dtype)
        new = lambda *shape: student.new_empty(shape, dtype=acc)
        return (new(), new(idx.shape[0]), new(student.shape[0]), new(teacher.shape[0]),
                new(teacher.shape[0], student.shape[1]))

    @torch.library.register_fake("proto_ce::dino_backward")
    def _dino_backward_fake(grad_loss, student, teacher, w_student, w_teacher, idx, center, lse_student,
                            lse_teacher, u, tau_s, tau_t, n_global, need_student, need_w):
        return (student.new_empty(student.shape) if need_student else student.new_empty((0,)),
                w_student.new_empty(w_student.shape) if need_w else w_student.new_empty((0,)))

    def setup_context(ctx, inputs, output):
        student, teacher, w_student, w_teacher, idx, center, tau_s, tau_t, n_global = inputs
        _, colsum, lse_student, lse_teacher, u = output
        ctx.save_for_backward(student, teacher, w_student, w_teacher, idx, center, lse_student, lse_teacher, u)
        ctx.constants = (tau_s, tau_t, n_global)
        ctx.mark_non_differentiable(colsum, lse_student, lse_teacher, u)

    def backward(ctx, grad_loss, *_unused):
        student, teacher, w_student, w_teacher, idx, center, lse_student, lse_teacher, u = ctx.saved_tensors
        need_student, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        grad_student, grad_w = torch.ops.proto_ce.dino_backward(
            grad_loss, student, teacher, w_student, w_teacher, idx, center, lse_student, lse_teacher, u,
            *ctx.constants, need_student, need_w)
        return (grad_student if need_student else None, None, grad_w if need_w else None,
                None, None, None, None, None, None)

    torch.library.register_autograd("proto_ce::dino_forward", backward, setup_context=setup_context)


# ---------------------------------------------------------------------------------------------------
# Loader: prebuilt extension -> cached JIT build -> reference
# ---------------------------------------------------------------------------------------------------

class _Loaded:
    where = None        # what was loaded (for messages), None when the reference is used
    has_cuda = False    # whether the loaded library registered CUDA kernels
    kernels = frozenset()  # (device type, op name) pairs with a registered kernel
    one_pass = os.environ.get("PROTO_CE_TWO_PASS", "0") != "1"  # mean/sum via xent_fused


_LOADED = _Loaded()


def _extension_handles(device):
    if _LOADED.where is None:
        return False
    return device.type == "cpu" or (device.type == "cuda" and _LOADED.has_cuda)


def _csrc_files(with_cuda):
    patterns = ("*.cpp", "*.cu") if with_cuda else ("*.cpp",)
    return sorted(f for p in patterns for f in glob.glob(os.path.join(_CSRC, p)))


def _sources_hash():
    """Hash of csrc/ (sources and headers). setup.py computes the same (keep the two in sync)."""
    digest = hashlib.sha256()
    for path in sorted(f for p in ("*.cpp", "*.cu", "*.h", "*.cuh") for f in glob.glob(os.path.join(_CSRC, p))):
        digest.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as f:
            digest.update(f.read() + b"\0")
    return digest.hexdigest()[:16]


def _prebuilt_info(path):
    """The PROTO_CE_BUILD_INFO[...] record compiled into a prebuilt library, read from the file."""
    with open(path, "rb") as f:
        match = re.search(rb"PROTO_CE_BUILD_INFO\[sources=(\w+);cuda=(\d)\]", f.read())
    return (match.group(1).decode(), match.group(2) == b"1") if match else (None, False)


def _cpp_extension():
    """torch.utils.cpp_extension. On a machine without a GPU its import logs "No CUDA runtime is found,
    using CUDA_HOME=..." whenever a CUDA toolkit is installed; this module never compiles CUDA there, so
    the message would only confuse: it is held back during that import (the logger is restored after)."""
    import logging
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    if not torch.cuda.is_available():
        logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


def _nvcc_found():
    return torch.version.cuda is not None and _cpp_extension().CUDA_HOME is not None


def _build_root():
    if os.environ.get("PROTO_CE_BUILD_DIR"):
        return os.environ["PROTO_CE_BUILD_DIR"]
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return os.path.join(os.environ["TORCH_EXTENSIONS_DIR"], "clip-beyond-tail")
    return os.path.join(os.path.expanduser("~"), ".cache", "clip-beyond-tail", "ext")


def _jit_build(with_cuda):
    """Compile csrc/ with ninja into the cache (once) and load it; returns the library path."""
    cpp_extension = _cpp_extension()
    sources = _csrc_files(with_cuda)
    if not sources:
        raise FileNotFoundError(f"no C++ sources in {_CSRC}")
    source_hash = _sources_hash()
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if with_cuda else ""
    key = "|".join([source_hash, torch.__version__, str(torch.version.cuda), sys.version, arch])
    name = f"proto_ce_{'cuda' if with_cuda else 'cpu'}_{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    build_dir = os.path.join(_build_root(), name)
    os.makedirs(build_dir, exist_ok=True)
    library = os.path.join(build_dir, name + ".so")
    lock = os.path.join(build_dir, "lock")  # the build lock torch.utils.cpp_extension takes
    if _torch_uses_os_file_lock(cpp_extension):
        # torch >= 2.12 holds an OS advisory lock on `lock` while it builds (released even if the builder
        # is killed; the file itself stays). Taking it here waits for a build in progress.
        if os.path.exists(library):  # the folder name is a hash of the sources: an existing build is current
            from filelock import FileLock
            with FileLock(lock):
                torch.ops.load_library(library)
            return library
    else:
        # older torch: the lock file exists exactly while a process builds (torch's FileBaton)
        if not os.path.exists(library):
            _wait_for_lock(lock)
        if os.path.exists(library):
            torch.ops.load_library(library)
            return library
    print(f"proto_ce: compiling the C++{' and CUDA' if with_cuda else ''} kernels into {build_dir} "
          "(first use only; a few minutes)...", file=sys.stderr, flush=True)
    flags = ["-O3", f"-DPROTO_CE_SOURCES_HASH={source_hash}"] + (["-DPROTO_CE_WITH_CUDA"] if with_cuda else [])
    cpp_extension.load(name=name, sources=sources, extra_cflags=flags, extra_cuda_cflags=flags,
                       build_directory=build_dir, with_cuda=with_cuda, is_python_module=False,
                       verbose=os.environ.get("PROTO_CE_VERBOSE") == "1")
    return library


def _torch_uses_os_file_lock(cpp_extension):
    """Whether this torch's JIT build lock is an OS advisory lock (filelock) rather than a FileBaton."""
    return hasattr(cpp_extension, "FileLock")


def _wait_for_lock(lock, quiet_seconds=10.0, stale_seconds=30 * 60):
    """Waits while another process compiles into this build folder (it holds torch's FileBaton `lock`).

    A lock older than `stale_seconds` was left by a process that died while compiling: it is removed,
    and this process compiles (torch's own wait would hang on it forever)."""
    waited = 0.0
    while os.path.exists(lock):
        try:
            age = time.time() - os.path.getmtime(lock)
        except OSError:  # released in the meantime
            continue
        if age > stale_seconds:
            print(f"proto_ce: removing the stale build lock {lock} ({age / 60:.0f} min old)", file=sys.stderr)
            try:
                os.remove(lock)
            except OSError:
                pass
            return
        if waited == quiet_seconds:
            print(f"proto_ce: waiting for another process compiling the extension (if none is running, "
                  f"delete {lock})", file=sys.stderr, flush=True)
        time.sleep(0.5)
        waited += 0.5


def _short_reason(error):
    """One line out of a (possibly long compiler-log) exception message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() and "Error building extension" not in line]
    line = (errors or lines or [type(error).__name__])[0]
    return line if len(line) <= 300 else line[:297] + "..."


def _load_extension():
    """Loads the compiled kernels; returns a description of what was loaded (None: use the reference)."""
    want_cuda = torch.cuda.is_available()
    spec = importlib.util.find_spec(_PREBUILT)
    if spec is not None and spec.origin:
        built_from, prebuilt_cuda = _prebuilt_info(spec.origin)
        stale = os.path.isdir(_CSRC) and built_from != _sources_hash()
        if stale:
            warnings.warn(f"proto_ce: ignoring the prebuilt {spec.origin}: it was built from other csrc/ sources "
                          "(rebuild it with `pip install --no-build-isolation .`); using a JIT build instead",
                          RuntimeWarning, stacklevel=3)
        elif prebuilt_cuda or not want_cuda or not (os.path.isdir(_CSRC) and _nvcc_found()):
            importlib.import_module(_PREBUILT)
            return spec.origin
    if not os.path.isdir(_CSRC):
        raise FileNotFoundError(f"no prebuilt {_PREBUILT} and no csrc/ next to {__file__} to compile")
    if want_cuda and _nvcc_found():
        try:
            return _jit_build(with_cuda=True)
        except Exception as error:  # noqa: BLE001 - any build failure: retry without the CUDA sources
            warnings.warn(f"proto_ce: compiling the CUDA kernels failed ({_short_reason(error)}); "
                          "building the CPU kernels only", RuntimeWarning, stacklevel=3)
    return _jit_build(with_cuda=False)


def _initialise():
    mode = os.environ.get("PROTO_CE_BACKEND", "auto").strip().lower() or "auto"
    if mode not in ("auto", "extension", "reference"):
        raise ValueError(f"proto_ce: PROTO_CE_BACKEND must be auto, extension or reference, got {mode!r}")
    if mode == "reference":
        return
    try:
        _LOADED.where = _load_extension()
    except Exception as error:  # noqa: BLE001 - any failure to build or load means: use the reference
        if mode == "extension":
            raise RuntimeError(f"proto_ce: PROTO_CE_BACKEND=extension but the extension could not be built "
                               f"or loaded: {_short_reason(error)}") from error
        warnings.warn(f"proto_ce: the C++/CUDA extension is unavailable ({_short_reason(error)}); using the "
                      "pure-PyTorch reference instead (slower, materialises [B, V] logits). "
                      "Set PROTO_CE_VERBOSE=1 to see the build log.", RuntimeWarning, stacklevel=3)
        return
    _LOADED.kernels = frozenset(
        (device, op) for device in ("cpu", "cuda")
        for op in ("label_positions", "xent_forward", "xent_fused")
        if torch._C._dispatch_has_kernel_for_dispatch_key(f"proto_ce::{op}", device.upper()))
    _LOADED.has_cuda = ("cuda", "xent_forward") in _LOADED.kernels
    _register_python_side()
    _register_dino_python_side()
    if torch.cuda.is_available() and not _LOADED.has_cuda:
        warnings.warn(f"proto_ce: the extension loaded from {_LOADED.where} has no CUDA kernels (nvcc not found "
                      "or the CUDA build failed); CUDA tensors use the pure-PyTorch reference",
                      RuntimeWarning, stacklevel=3)


_initialise()
