"""Build mamba-ssm's `selective_scan_cuda` kernel for this machine's GPU only, from mamba-ssm's source distribution.

Used by `scripts/device_checks.sh` on a CUDA machine (the project's install builds mamba-ssm without its kernels).
The flags are those of mamba-ssm 2.3.2's setup.py, for one architecture (this GPU's) instead of eight. The backward
kernels for complex A are replaced by stubs that raise: paperlab supports real A only (`paperlab.ssm.check_scan_args`),
and they are the slowest files to compile.

    python3 scripts/build_selective_scan.py SDIST_DIR BUILD_DIR
Afterwards `import selective_scan_cuda` works with BUILD_DIR on PYTHONPATH.
"""
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.cpp_extension import load

STUB = """// stubs: complex-A backward kernels are not built here (paperlab uses real A)
#include <cstdint>
#include <stdexcept>
#include <cuda_runtime.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/complex.h>
#include "selective_scan.h"
template<typename input_t, typename weight_t> void selective_scan_bwd_cuda(SSMParamsBwd &params, cudaStream_t stream);
#define STUB(T) template<> void selective_scan_bwd_cuda<T, c10::complex<float>>(SSMParamsBwd &, cudaStream_t) { \\
    throw std::runtime_error("selective_scan_cuda built by paperlab without complex-A backward kernels"); }
STUB(float)
STUB(c10::Half)
STUB(c10::BFloat16)
"""


def main(src: str, build: str) -> None:
    src, build = Path(src) / "csrc" / "selective_scan", Path(build)
    build.mkdir(parents=True, exist_ok=True)
    (build / "bwd_complex_stubs.cu").write_text(STUB)
    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}"
    sources = [src / "selective_scan.cpp"] + [src / f"selective_scan_fwd_{t}.cu" for t in ("fp32", "fp16", "bf16")] + \
              [src / f"selective_scan_bwd_{t}_real.cu" for t in ("fp32", "fp16", "bf16")] + [build / "bwd_complex_stubs.cu"]
    nvcc = ["-O3", "-std=c++17", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_BFLOAT162_OPERATORS__",
            "-U__CUDA_NO_BFLOAT162_CONVERSIONS__", "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math",
            "-lineinfo", f"-gencode=arch=compute_{arch},code=sm_{arch}"]
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    t0 = time.time()
    load("selective_scan_cuda", [str(s) for s in sources], extra_cflags=["-O3", "-std=c++17"], extra_cuda_cflags=nvcc,
         extra_include_paths=[str(src)], build_directory=str(build), verbose=False)
    print(f"built selective_scan_cuda for sm_{arch} in {time.time() - t0:.0f} s into {build}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
