"""Storage: the schema (SQLAlchemy Core), the engine for SQLite or PostgreSQL, migrations."""
