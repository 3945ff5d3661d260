"""The programs people run; client/ and server/ install here (see pyproject.toml)."""
