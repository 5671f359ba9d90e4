//! The CUDA backend (cudarc; kernels compiled by NVRTC at start).
