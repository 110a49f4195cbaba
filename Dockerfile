# Sluice gateway image: `docker build -t sluice .`
# The gateway is built with its code laid out by a training run on the
# simulator (scripts/bolt-release, LLVM BOLT: about a fifth less CPU per
# request); `--build-arg BOLT=0` builds the plain release binary instead.
FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# scripts/bolt-release installs BOLT (Debian's bolt-19) itself.
ARG BOLT=1
RUN if [ "$BOLT" = 1 ]; then \
      scripts/bolt-release && cp target/release/sluice-bolt /src/sluice; \
    else \
      cargo build --release -p sluice --bin sluice && cp target/release/sluice /src/sluice; \
    fi

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/sluice /usr/local/bin/sluice
USER 65534:65534
ENTRYPOINT ["/usr/local/bin/sluice"]
CMD ["run", "-c", "/etc/sluice/gateway.yaml"]
