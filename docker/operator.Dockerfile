# syntax=docker/dockerfile:1.7
# The operator image: one static (musl) binary on distroless/static, running as UID 65532.
#
#   docker build -f docker/operator.Dockerfile -t ghcr.io/deepseek-serving/deepseek-operator:0.1.0 .
#
# Multi-arch: docker buildx build --platform linux/amd64,linux/arm64 -f docker/operator.Dockerfile ...

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
# musl-gcc compiles ring's C and assembly for the static target. Multi-arch builds run this
# stage under each platform (buildx with QEMU), so no cross toolchain is needed.
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/*
RUN echo "$(uname -m)-unknown-linux-musl" > /rust-target \
 && rustup target add "$(cat /rust-target)"
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,sharing=locked \
    target="$(cat /rust-target)" \
 && cargo build --release --locked -p deepseek-operator --target "$target" \
 && install -D -m 0755 "target/$target/release/deepseek-operator" /out/deepseek-operator

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/deepseek-operator /usr/local/bin/deepseek-operator
# distroless's nonroot user; the chart and deploy/ set the same IDs and a read-only root.
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/deepseek-operator"]
CMD ["run"]
