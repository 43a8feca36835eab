"""The controller's web UI for fleet operators: server-rendered pages on the API's aiohttp app."""
