"""The controller service: ingest, scheduling, scoring, routing and the bundled sender."""
