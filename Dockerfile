# Builds every binary of the workspace: lb-server, lbctl, greeter-server,
# greeter-client, demo.
FROM rust:1-bookworm AS build
RUN apt-get update -qq && apt-get install -y -qq protobuf-compiler >/dev/null
WORKDIR /src
COPY . .
RUN cargo build --release --bins && \
    mkdir /out && cp target/release/lb-server target/release/lbctl target/release/greeter-server \
      target/release/greeter-client target/release/demo /out/

FROM debian:bookworm-slim
COPY --from=build /out/ /usr/local/bin/
ENTRYPOINT ["lb-server"]
