# syntax=docker/dockerfile:1
# Warren's two binaries, `warren` (dispatcher CLI) and `warren-worker`, in one small image.
#   docker build -t warren .
#   docker run --rm -e WARREN_AMQP_URL=amqp://guest:guest@HOST:5672/%2f warren
# docker-compose.yml builds and runs it next to RabbitMQ.

# --- build ------------------------------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /src
# Only what the build needs (never target/ or .warren/). Cargo.lock pins every dependency.
COPY Cargo.toml Cargo.lock ./
COPY patches ./patches
COPY core ./core
COPY dispatcher ./dispatcher
COPY workers ./workers
COPY service ./service
COPY cli ./cli
COPY bench ./bench
COPY tests ./tests
# The cache mounts keep downloaded crates and compiled dependencies between builds; the binaries
# are copied out of the cached target/ because a cache mount is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bins \
    && mkdir -p /out \
    && cp target/release/warren target/release/warren-worker /out/

# --- runtime ----------------------------------------------------------------------------------
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=builder /out/warren /out/warren-worker /usr/local/bin/
# No root needed: the binaries only talk AMQP and read their config.
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin warren
USER warren
WORKDIR /home/warren
ENV RUST_LOG=info
CMD ["warren-worker", "--queue", "default"]
