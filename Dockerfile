# The Inventory Service image: `docker compose up` builds it (see docker-compose.yml).
# Stage 1 generates the gRPC modules (built, never committed) and builds a wheel;
# stage 2 installs only that wheel and its dependencies, and runs as a plain user.

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY . .
RUN pip install "grpcio-tools>=1.60" \
 && python -m proto.build \
 && pip wheel --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    INVENTORY_GRPC_PORT=50051 INVENTORY_HTTP_PORT=8080
COPY --from=build /wheels /wheels
RUN pip install /wheels/*.whl \
 && rm -rf /wheels \
 && useradd --system --create-home --home-dir /srv/inventory --shell /usr/sbin/nologin inventory
USER inventory
WORKDIR /srv/inventory
EXPOSE 50051 8080
CMD ["inventory", "serve"]
