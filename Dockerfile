# One image with every Flotilla binary: api, scheduler, terminator, watchdog,
# provider-adapter, agent, flotilla-sim (the simulated cloud) and the
# `flotilla` CLI. Pick the service with the command, e.g.
#   docker run --rm flotilla:dev api --help
#
# Build:  docker build -t flotilla:dev .
# The protobuf code is generated with protox (pure Rust), so no protoc is
# needed; TLS is rustls, so no OpenSSL either.
#
# The base images are build arguments whose defaults are the public images.
# Where no registry can be reached, `scripts/images.sh` builds a Debian base
# with debootstrap and the `prebuilt` target packages binaries built on the
# host (copied to .docker-bin/) into the same runtime stage:
#   docker build --target prebuilt --build-arg RUNTIME_IMAGE=flotilla-base:bookworm .

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm
ARG RUST_IMAGE=rust:${RUST_VERSION}-${DEBIAN_RELEASE}
ARG RUNTIME_IMAGE=debian:${DEBIAN_RELEASE}-slim

# Stage order matters: the runtime base and the `prebuilt` target come
# before the Rust build, so the classic builder (which builds every stage
# up to its target) builds `prebuilt` without a Rust image.

############################################################################
# runtime-base: slim Debian, CA certificates for the provider APIs, curl for
# the compose health checks, tini, an unprivileged user. A base that already
# has the packages (the debootstrap one) installs nothing.
############################################################################
FROM ${RUNTIME_IMAGE} AS runtime-base

# Package versions are not pinned (DL3008): Debian drops superseded versions
# from its mirrors, so pins break rebuilds; the release pins the set instead.
# hadolint ignore=DL3008
RUN if ! command -v tini >/dev/null || ! command -v curl >/dev/null \
        || [ ! -e /etc/ssl/certs/ca-certificates.crt ]; then \
        apt-get update \
     && apt-get install -y --no-install-recommends ca-certificates curl tini \
     && rm -rf /var/lib/apt/lists/*; \
    fi \
 && groupadd --system --gid 10001 flotilla \
 && useradd --system --uid 10001 --gid flotilla --home-dir /var/lib/flotilla \
        --create-home --shell /usr/sbin/nologin flotilla

# Containers listen on every interface (the binaries default to 127.0.0.1,
# right for a laptop, wrong in a container). Each can still be overridden.
ENV LOG_FORMAT=json \
    METRICS_ADDR=0.0.0.0:9090 \
    API_LISTEN=0.0.0.0:50051 \
    PROVIDER_ADAPTER_LISTEN=0.0.0.0:50061 \
    SIM_LISTEN=0.0.0.0:4280 \
    LOCAL_STATE_DIR=/var/lib/flotilla/local

USER 10001:10001
WORKDIR /var/lib/flotilla

# tini forwards SIGTERM to the service (which drains under
# SHUTDOWN_GRACE_SECONDS) and reaps the local provider's child processes.
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["api", "--help"]

LABEL org.opencontainers.image.title="flotilla" \
      org.opencontainers.image.description="Flotilla control plane: api, scheduler, terminator, watchdog, provider-adapter, agent, flotilla-sim, flotilla CLI" \
      org.opencontainers.image.licenses="Apache-2.0"

############################################################################
# prebuilt: the runtime with binaries built on the host (.docker-bin/)
############################################################################
FROM runtime-base AS prebuilt
COPY .docker-bin/ /usr/local/bin/

############################################################################
# build: compile every binary in release mode from the locked dependency set
############################################################################
FROM ${RUST_IMAGE} AS build
WORKDIR /src

# Copy only what the build reads (see .dockerignore), then build with the
# registry and target directory in cache mounts so rebuilds are incremental.
COPY Cargo.toml Cargo.lock ./
COPY crates ./crates
COPY proto ./proto
COPY migrations ./migrations
COPY tests ./tests
COPY docs ./docs

ENV CARGO_TERM_COLOR=never \
    CARGO_INCREMENTAL=0
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked \
        -p flotilla-api \
        -p flotilla-scheduler \
        -p flotilla-terminator \
        -p flotilla-watchdog \
        -p flotilla-provider-adapter \
        -p flotilla-agent \
        -p flotilla-sim-provider \
        -p flotilla-cli \
        --bins \
 && mkdir -p /out \
 && for bin in api scheduler terminator watchdog provider-adapter agent flotilla-sim flotilla; do \
        install -m 0755 "target/release/$bin" "/out/$bin"; \
    done

############################################################################
# runtime (the default target): the runtime with the binaries built above
############################################################################
FROM runtime-base AS runtime
COPY --from=build /out/ /usr/local/bin/
