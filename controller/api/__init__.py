"""The controller's REST API (``/api/v1``): aiohttp handlers split by domain, pydantic models for
every body and answer, bearer tokens with roles, and an OpenAPI document written from the same
declarations. ``controller.api.app.make_app`` builds the application; ``run_api`` serves it until
stopped."""
