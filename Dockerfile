# The stampflow service image: the CLI and the orchestrator and reducer nodes.
#   docker build -t stampflow .                                  # on python:3.11-slim
#   docker build --build-arg BASE_IMAGE=local/python:3.11 -t stampflow .   # this repo's CI
# Generation needs the inference extra (torch, diffusers: several GB); add it with
#   --build-arg EXTRAS=inference
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
ARG EXTRAS=""
RUN python3 -m venv /opt/stampflow
COPY pyproject.toml README.md /src/
COPY src /src/src
COPY migrations /src/migrations
RUN /opt/stampflow/bin/pip install --no-cache-dir "/src${EXTRAS:+[$EXTRAS]}"
ENV PATH=/opt/stampflow/bin:$PATH STAMPFLOW_SERVICES=external STAMPFLOW_LOG_FORMAT=json
WORKDIR /data
ENTRYPOINT ["stampflow"]
CMD ["--help"]
