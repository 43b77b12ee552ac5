# Prometheus on the local base image, from the host's Debian package (no registry here): the
# binary is copied into the build context by scripts/test-deploy.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
COPY prometheus /usr/bin/prometheus
USER 65534
ENTRYPOINT ["/usr/bin/prometheus"]
