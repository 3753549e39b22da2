"""What a provider's error body says, read the same way by the API's provider checks (providers.py)
and by the built-in workers' failures (worker/failure.py)."""

from __future__ import annotations

# Error types and codes in a provider's error body that say the key was refused, whatever the status:
# a LiteLLM proxy without a database answers an unknown key with HTTP 400 and type no_db_connection.
AUTH_ERROR_CODES = frozenset({"no_db_connection", "invalid_api_key", "authentication_error", "auth_error"})
