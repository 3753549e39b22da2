FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY aiservice ./aiservice
COPY worker ./worker
COPY schema ./schema
# Editable install: the migrator reads schema/ next to the package.
RUN pip install --no-cache-dir -e . \
    && useradd --system --uid 10001 aiservice
USER aiservice

EXPOSE 8080 8081
CMD ["aiservice", "serve"]
