"""The built-in workers (LLM, WhisperX): `aiservice worker`, or beside the API in `aiservice dev`."""
