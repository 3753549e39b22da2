"""SQL-level tests, one file per schema/functions/<area>.sql: "I changed claim.sql" means running
tests/sql/test_claim.py. Helpers: tests/sqlapi.py; fixtures: tests/conftest.py."""
