# syntax=docker/dockerfile:1
# Multi-stage build: a cached dependency layer, then the engine; the runtime
# image is Debian slim with a non-root user, the binary, and the shipped
# pipelines, schemas and migrations (all read at run time: mount your own
# over /app/pipelines etc. to change behaviour without rebuilding).

FROM rust:1-slim-bookworm AS build
WORKDIR /src
# Dependencies first: this layer is rebuilt only when Cargo.toml/Cargo.lock change.
# The manifest names the benchmark's file, so a stub stands in for it (cargo
# build never compiles it).
COPY Cargo.toml Cargo.lock ./
RUN mkdir src benches && echo 'fn main() {}' > src/main.rs && cp src/main.rs benches/bench.rs \
 && cargo build --release --locked \
 && rm -rf src target/release/.fingerprint/ingestd-* target/release/deps/ingestd-* target/release/ingestd
COPY src ./src
RUN cargo build --release --locked && strip target/release/ingestd

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin ingestd
WORKDIR /app
COPY --from=build /src/target/release/ingestd /usr/local/bin/ingestd
COPY pipelines ./pipelines
COPY schemas ./schemas
COPY migrations ./migrations
USER 10001
ENV PORT=3001 NODE_ENV=production
EXPOSE 3001
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 CMD ["ingestd", "healthcheck"]
ENTRYPOINT ["ingestd"]
CMD ["run", "--pipelines", "/app/pipelines"]
