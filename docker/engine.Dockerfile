# syntax=docker/dockerfile:1.7
# The engine image: the Rust binary on the CUDA 13.0 runtime image, which carries the libraries
# the engine loads at run time (libnvrtc.so.13 for its kernels, libcublasLt, libnccl.so.2).
# Nothing CUDA is linked at build time (cudarc loads the libraries dynamically), so the build
# stage needs no CUDA toolkit. The GPU driver (libcuda.so.1) comes from the node through the
# NVIDIA container toolkit; without a GPU the same image serves on the CPU.
#
#   docker build -f docker/engine.Dockerfile -t ghcr.io/deepseek-serving/deepseek-engine:0.1.0 .
#
# The runtime base must not be older than the nodes' driver supports: CUDA 13.0 needs driver
# 580 or newer.

ARG RUST_VERSION=1.95
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
# Built on glibc 2.36 (bookworm); runs on the runtime image's newer glibc.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p deepseek-engine \
 && install -D -m 0755 target/release/deepseek-engine /out/deepseek-engine

FROM ${CUDA_IMAGE}
# A fixed non-root user; the NVRTC PTX cache and downloads go to its home or to mounted volumes.
RUN groupadd --system --gid 65532 engine \
 && useradd --system --uid 65532 --gid 65532 --home-dir /home/engine --create-home engine \
 && apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/deepseek-engine /usr/local/bin/deepseek-engine
# The bundled trained model, where the binary looks for it (<bin>/../share/deepseek-engine/models).
COPY --from=build /src/models/deepseek-v3.2-mini /usr/local/share/deepseek-engine/models/deepseek-v3.2-mini
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    HOME=/home/engine
USER 65532:65532
WORKDIR /home/engine
# The operator sets command and args; this default serves the bundled trained model.
EXPOSE 8000 29500
ENTRYPOINT ["deepseek-engine"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
