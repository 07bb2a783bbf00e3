-- Run once, when the PostgreSQL volume is created: MLflow gets its own database next to the Optuna one
-- (both keep an `alembic_version` table, so they cannot share a schema).
CREATE DATABASE mlflow;
