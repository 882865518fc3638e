# Which C++ throws crash on this torch? Each case runs in its own process (a crash must not hide the others).
import os, subprocess, sys, textwrap
import torch
from torch.utils.cpp_extension import load_inline

CPP = textwrap.dedent('''
#include <torch/library.h>
#include <ATen/ATen.h>
at::Tensor cu_ok(const at::Tensor& x);
at::Tensor cu_throw_direct(const at::Tensor& x);
at::Tensor cu_calls_cpp_thrower(const at::Tensor& x);
void cpp_thrower(int64_t n) { TORCH_CHECK(false, "diag: thrown in g++ code ", n); }
at::Tensor cpp_after_cu(const at::Tensor& x) { auto y = cu_ok(x); TORCH_CHECK(false, "diag: g++ throw after .cu returned"); return y; }
at::Tensor cpp_throw(const at::Tensor& x) { TORCH_CHECK(false, "diag: plain g++ throw, CUDA key"); return x; }
TORCH_LIBRARY(diagcu, m) {
  m.def("cu_ok(Tensor x) -> Tensor"); m.def("cu_throw_direct(Tensor x) -> Tensor");
  m.def("cu_calls_cpp_thrower(Tensor x) -> Tensor"); m.def("cpp_after_cu(Tensor x) -> Tensor");
  m.def("cpp_throw(Tensor x) -> Tensor");
}
TORCH_LIBRARY_IMPL(diagcu, CUDA, m) {
  m.impl("cu_ok", &cu_ok); m.impl("cu_throw_direct", &cu_throw_direct);
  m.impl("cu_calls_cpp_thrower", &cu_calls_cpp_thrower); m.impl("cpp_after_cu", &cpp_after_cu);
  m.impl("cpp_throw", &cpp_throw);
}
''')
CU = textwrap.dedent('''
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
void cpp_thrower(int64_t n);
__global__ void add_one(float* p) { p[threadIdx.x] += 1.f; }
at::Tensor cu_ok(const at::Tensor& x) { auto y = x.clone(); add_one<<<1, 1>>>(y.data_ptr<float>()); return y; }
at::Tensor cu_throw_direct(const at::Tensor& x) { TORCH_CHECK(x.numel() < 0, "diag: thrown in nvcc host code"); return x; }
at::Tensor cu_calls_cpp_thrower(const at::Tensor& x) { auto y = cu_ok(x); cpp_thrower(x.numel()); return y; }
''')
CASES = ["cu_ok", "cpp_throw", "cpp_after_cu", "cu_calls_cpp_thrower", "cu_throw_direct"]
build_dir = "/tmp/diagcu"
os.makedirs(build_dir, exist_ok=True)
load_inline("diagcu", cpp_sources=[CPP], cuda_sources=[CU], is_python_module=False, build_directory=build_dir,
            extra_cflags=["-O3"], extra_cuda_cflags=["-O3"])
if len(sys.argv) > 1:
    try:
        out = getattr(torch.ops.diagcu, sys.argv[1])(torch.zeros(3, device="cuda"))
        torch.cuda.synchronize()
        print("  returned", out.tolist())
    except Exception as e:
        print("  raised", type(e).__name__, str(e).splitlines()[0])
    sys.exit(0)
print("torch", torch.__version__, "cuda", torch.version.cuda, flush=True)
for name in CASES:
    r = subprocess.run([sys.executable, __file__, name], capture_output=True, text=True)
    print(f"{name}: exit {r.returncode}", (r.stdout.strip() or r.stderr.strip().splitlines()[:1]), flush=True)
