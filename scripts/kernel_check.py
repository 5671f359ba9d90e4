#!/usr/bin/env python3
"""Compiles every kernel family the way the engine does (NVRTC, the shared prelude first) and
runs ptxas on the PTX, printing each kernel's registers, spills and shared memory. Needs no GPU:
only libnvrtc and ptxas (for example from the nvidia-cuda-nvrtc and nvidia-cuda-nvcc wheels).

    scripts/kernel_check.py --nvrtc <libnvrtc.so> --ptxas <ptxas> [--arch sm_90a] [family ...]
"""
import argparse
import ctypes
import pathlib
import re
import subprocess
import sys
import tempfile

KERNELS = pathlib.Path(__file__).resolve().parent.parent / "engine/src/backend/cuda/kernels"


def nvrtc_compile(lib, name, src, arch):
    prog = ctypes.c_void_p()
    check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), f"{name}.cu".encode(), 0, None, None))
    opts = [f"--gpu-architecture={arch}".encode(), b"--std=c++17"]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    if rc != 0:
        sys.stderr.write(log.value.decode(errors="replace"))
        raise SystemExit(f"{name}: NVRTC failed")
    if log.value.strip():
        sys.stderr.write(log.value.decode(errors="replace"))
    lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    check(lib, lib.nvrtcGetPTX(prog, ptx))
    return ptx.value.decode()


def check(lib, rc):
    if rc != 0:
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise SystemExit(f"NVRTC error {rc}: {lib.nvrtcGetErrorString(rc).decode()}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nvrtc", required=True)
    ap.add_argument("--ptxas", required=True)
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("families", nargs="*")
    a = ap.parse_args()
    # NVRTC loads its builtins library from beside itself.
    ctypes.CDLL(str(pathlib.Path(a.nvrtc).parent / "libnvrtc-builtins.so.13.0"), mode=ctypes.RTLD_GLOBAL)
    lib = ctypes.CDLL(a.nvrtc)
    common = (KERNELS / "common.cuh").read_text()
    fams = a.families or sorted(p.stem for p in KERNELS.glob("*.cu"))
    spills = 0
    for fam in fams:
        ptx = nvrtc_compile(lib, fam, common + "\n" + (KERNELS / f"{fam}.cu").read_text(), a.arch)
        with tempfile.TemporaryDirectory() as d:
            p = pathlib.Path(d) / f"{fam}.ptx"
            p.write_text(ptx)
            out = subprocess.run([a.ptxas, f"-arch={a.arch}", "-v", str(p), "-o", str(p.with_suffix(".cubin"))],
                                 capture_output=True, text=True)
        if out.returncode != 0:
            sys.stderr.write(out.stderr)
            raise SystemExit(f"{fam}: ptxas failed")
        kernel = None
        for line in out.stderr.splitlines():
            m = re.search(r"Compiling entry function '(\w+)'", line)
            if m:
                kernel = m.group(1)
            m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
            if m:
                spill = (int(m.group(1)), int(m.group(2)))
                spills += spill[0] + spill[1]
            m = re.search(r"Used (\d+) registers", line)
            if m and kernel:
                smem = re.search(r"(\d+) bytes smem", line)
                smem = smem.group(1) if smem else "0"
                print(f"{fam:10} {kernel:32} regs {m.group(1):>3}  smem {smem:>6}  spill st/ld {spill[0]}/{spill[1]}")
    print(f"total spill bytes: {spills}")


if __name__ == "__main__":
    main()
