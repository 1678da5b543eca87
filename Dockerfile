# The scgrn-assets image: the package and the Dagster services that run it (code server,
# webserver, daemon), with Postgres and Kubernetes support. Used by docker-compose.yml and by
# the Helm values in deploy/kubernetes/.
FROM python:3.11-slim

# PyPI's Linux torch wheel brings its CUDA libraries, which the model steps use on GPU hosts;
# a CPU-only image is smaller: --build-arg TORCH_SPEC="torch==2.13.0 --index-url <CPU wheel index>".
ARG TORCH_SPEC=torch==2.13.0
ARG DAGSTER_LIBRARIES="dagster-postgres==0.29.27 dagster-k8s==0.29.27"

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DAGSTER_HOME=/opt/dagster/dagster_home \
    SCGRN_HOME=/data/scgrn

WORKDIR /opt/dagster/app

RUN pip install ${TORCH_SPEC}

COPY pyproject.toml README.md ./
COPY scgrn_assets ./scgrn_assets
RUN pip install . ${DAGSTER_LIBRARIES}

# The instance (Postgres storage, run queue, gpu pool) and the workspace that finds the code server.
COPY deploy/compose/dagster.yaml ${DAGSTER_HOME}/dagster.yaml
COPY deploy/compose/workspace.yaml /opt/dagster/app/workspace.yaml

RUN useradd --create-home --uid 10001 scgrn \
    && mkdir -p ${SCGRN_HOME} ${DAGSTER_HOME}/storage ${DAGSTER_HOME}/compute_logs \
    && chown -R scgrn:scgrn ${SCGRN_HOME} ${DAGSTER_HOME}
USER scgrn

EXPOSE 3000 4000
CMD ["dagster", "code-server", "start", "-h", "0.0.0.0", "-p", "4000", "-m", "scgrn_assets.definitions"]
