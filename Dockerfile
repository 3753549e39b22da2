FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY aiservice ./aiservice
COPY worker ./worker
COPY schema ./schema
RUN pip wheel --no-cache-dir --no-deps -w /dist .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# The wheel carries the SQL (aiservice/schema): nothing from the source tree is needed at run time.
COPY --from=build /dist /dist
RUN pip install --no-cache-dir /dist/*.whl \
    && rm -rf /dist \
    && useradd --system --uid 10001 aiservice
USER aiservice

EXPOSE 8080 8081
CMD ["aiservice", "serve"]
