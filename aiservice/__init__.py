"""aiservice: a PostgreSQL-native job service for AI workloads."""

__version__ = "0.1.0"
