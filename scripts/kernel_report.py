#!/usr/bin/env python3
"""Compiles weightlift's CUDA kernels (crates/weightlift-cuda/src/kernels/*.cu, one NVRTC program
as kernels.rs puts them together) for a GPU architecture on a machine without a GPU, and prints
what ptxas reports per kernel: registers, spills, stack and shared memory. What a kernel costs
an SM, at no device time.

Needs NVRTC and ptxas, e.g. from the pip wheels nvidia-cuda-nvrtc and nvidia-cuda-nvcc
(unpacked anywhere; `pip download --no-deps nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-nvcc==13.0.88`):
    python3 scripts/kernel_report.py --cuda /opt/nv/nvidia/cu13 [--arch sm_90] [--ptx out.ptx]
"""

import argparse
import ctypes
import json
import pathlib
import re
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
KERNELS = ROOT / "crates/weightlift-cuda/src/kernels.rs"


def cuda_source() -> str:
    """SOURCE as kernels.rs builds it: a concat! of string literals and include_str!("kernels/*.cu")."""
    text = KERNELS.read_text()
    match = re.search(r"const SOURCE: &str = concat!\((.*?)\);", text, re.S)
    if not match:
        sys.exit(f"no `const SOURCE: &str = concat!(...);` in {KERNELS}")
    parts = []
    for path, literal in re.findall(r'include_str!\("([^"]+)"\)|"((?:[^"\\]|\\.)*)"', match.group(1)):
        parts.append((KERNELS.parent / path).read_text() if path else json.loads(f'"{literal}"'))
    return "".join(parts)


def compile_ptx(nvrtc: ctypes.CDLL, source: str, arch: str) -> str:
    prog = ctypes.c_void_p()
    check = lambda rc, what: rc == 0 or sys.exit(f"{what} failed with NVRTC code {rc}")
    check(nvrtc.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"kernels.cu", 0, None, None), "nvrtcCreateProgram")
    opts = [f"--gpu-architecture={arch}".encode()]
    rc = nvrtc.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    if log.value.strip():
        print(log.value.decode(), file=sys.stderr)
    check(rc, "nvrtcCompileProgram")
    nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    check(nvrtc.nvrtcGetPTX(prog, ptx), "nvrtcGetPTX")
    return ptx.value.decode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cuda", required=True, help="folder holding lib/libnvrtc.so.* and bin/ptxas")
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--ptx", help="also write the PTX here")
    args = parser.parse_args()
    cuda = pathlib.Path(args.cuda)
    libs = sorted((cuda / "lib").glob("libnvrtc.so*"))
    if not libs:
        sys.exit(f"no libnvrtc.so* under {cuda / 'lib'}")
    # NVRTC opens its builtins library by name: load it first from the same folder.
    for builtins in sorted((cuda / "lib").glob("libnvrtc-builtins.so*")):
        ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
        break
    ptx = compile_ptx(ctypes.CDLL(str(libs[0])), cuda_source(), args.arch)
    if args.ptx:
        pathlib.Path(args.ptx).write_text(ptx)
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "kernels.ptx"
        path.write_text(ptx)
        out = subprocess.run(
            [str(cuda / "bin/ptxas"), f"--gpu-name={args.arch}", "-v", str(path), "-o", str(path.with_suffix(".cubin"))],
            capture_output=True,
            text=True,
        )
    if out.returncode != 0:
        sys.exit(out.stderr)
    # ptxas -v: "Compiling entry function 'name'" then "Used N registers, ... smem ..." lines.
    name = None
    for line in out.stderr.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)'", line):
            name = m.group(1)
        elif name and ("Used" in line or "spill" in line or "stack frame" in line):
            print(f"{name:28} {line.split('info    :')[-1].strip()}")


if __name__ == "__main__":
    main()
