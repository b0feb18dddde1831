# The container image: compiled in a Rust image, run from a distroless one (glibc, CA roots, no shell) as
# uid 10001. The base images are build arguments so that machines without Docker Hub can pass images made
# from Debian packages (scripts/image.sh); keep both on one Debian release (the binary links its glibc).
ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12

FROM ${RUST_IMAGE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends libcap2-bin \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
# The release profile keeps line tables for profiling; the image needs none. Binding 80/443 without root:
# the capability lives on the binary (COPY keeps it), not on the user; under Docker's default bridge
# network unprivileged ports start at 0 anyway.
RUN cargo build --release --locked --bin portcullis \
 && strip target/release/portcullis \
 && setcap cap_net_bind_service=+ep target/release/portcullis \
 && mkdir -p /out/certs /out/etc/portcullis \
 && chown 10001:10001 /out/certs

FROM ${RUNTIME_IMAGE}
COPY --from=build /src/target/release/portcullis /usr/local/bin/portcullis
COPY --from=build /out/etc/portcullis /etc/portcullis
COPY --from=build --chown=10001:10001 /out/certs /certs
# No config is baked in: mount yours read-only at /etc/portcullis/portcullis.toml (an image that silently
# ordered certificates for example.com would be worse than one that says the file is missing), or run
# `reverse-proxy --domain … --to …`, which keeps its state in /certs.
ENV PORTCULLIS_STATE=/certs
USER 10001:10001
VOLUME ["/certs"]
EXPOSE 80 443
# SIGTERM: stop accepting, finish in-flight requests (server.shutdown_grace), exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/portcullis"]
CMD ["run", "--config", "/etc/portcullis/portcullis.toml"]
