# The demo target of docker-compose.yml: a static web page served by busybox httpd, standing for a
# service that only the agents' network can reach. Build context: docker/compose/target.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
# The CI base includes busybox (scripts/build-base-image); the public base gets it from apt.
RUN command -v busybox >/dev/null \
    || (apt-get update && apt-get install -y --no-install-recommends busybox \
        && rm -rf /var/lib/apt/lists/*)
COPY index.html /srv/index.html
USER nobody
EXPOSE 8000
CMD ["busybox", "httpd", "-f", "-v", "-p", "8000", "-h", "/srv"]
