# Multi-stage build: compile in the Rust image, run from a small Debian slim image as a non-root user.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin portcullis \
 && strip target/release/portcullis  # the release profile keeps line tables for profiling; the image needs none

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libcap2-bin \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin portcullis \
 && mkdir -p /certs /etc/portcullis \
 && chown portcullis /certs
COPY --from=build /src/target/release/portcullis /usr/local/bin/portcullis
# Bind 80/443 without root: the capability lives on the binary, not on the user.
RUN setcap cap_net_bind_service=+ep /usr/local/bin/portcullis \
 && apt-get purge -y libcap2-bin && apt-get autoremove -y
# No config is baked in: mount yours read-only at /etc/portcullis/portcullis.toml (an image that silently
# ordered certificates for example.com would be worse than one that says the file is missing).
USER portcullis
VOLUME ["/certs"]
EXPOSE 80 443
# SIGTERM: stop accepting, finish in-flight requests (server.shutdown_grace), exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/portcullis"]
CMD ["run", "--config", "/etc/portcullis/portcullis.toml"]
