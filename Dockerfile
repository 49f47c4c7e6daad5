# Multi-stage image for the server, the worker and the migration job.
# The commands are the same as the README's: `entrepot migrate`, `entrepot serve`, `entrepot worker`.
FROM python:3.11-slim AS build
WORKDIR /src
COPY requirements.lock pyproject.toml ./
COPY generated/python generated/python
COPY clients/python clients/python
COPY server server
COPY domain domain
COPY migrations migrations
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir -r requirements.lock \
 && /opt/venv/bin/pip install --no-cache-dir --no-deps ./generated/python ./clients/python .

FROM python:3.11-slim
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    ENTREPOT_LISTEN=0.0.0.0:50051 \
    ENTREPOT_METRICS_HOST=0.0.0.0 \
    ENTREPOT_METRICS_PORT=9464 \
    ENTREPOT_WORKER_METRICS_PORT=9465
USER 10001
EXPOSE 50051 9464 9465
ENTRYPOINT ["entrepot"]
CMD ["serve"]
