"""The web UI's typed application state (aiohttp app keys), in one place for every page."""

from __future__ import annotations

from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from controller.config import ApiConfig, UiConfig

UI_ENGINE = web.AppKey("ui_engine", AsyncEngine)
UI_CONFIG = web.AppKey("ui_config", UiConfig)
UI_API_CONFIG = web.AppKey("ui_api_config", ApiConfig)
