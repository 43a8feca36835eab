"""Commands from the controller: ``request/{cmd}`` in, ``response/{cmd}`` out, zigbee2mqtt style.

Every request carries a ``transaction`` id that the response echoes in the fixed envelope
``{transaction, status: ok|error, data, error}``. A malformed request or an unknown command gets
an error response and changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from probe_agent import config as config_module
from probe_agent.protocol import COMMANDS, CommandRequest, CommandResponse, TimeRequestData

if TYPE_CHECKING:
    from probe_agent.agent import Agent

log = logging.getLogger(__name__)

#: How long a modem may take to come back after a reset before the next step is tried.
RESET_WAIT_S = 20.0
HARD_RESET_TIMEOUT_S = 60.0


class CommandError(Exception):
    """A command that cannot be carried out; its message goes into the error response."""


class Commands:
    """Dispatches requests to handlers and publishes the responses."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._handlers: dict[str, Callable[[dict[str, Any], datetime], Awaitable[dict[str, Any]]]] = {
            "time": self._time,
            "reload": self._reload,
            "modem-reset": self._modem_reset,
            "rescan": self._rescan,
            "storage": self._storage,
        }
        assert set(self._handlers) == set(COMMANDS)

    async def handle(self, command: str, payload: bytes, received_at: datetime) -> None:
        """Answer one request; never raises."""
        response = await self.answer(command, payload, received_at)
        await self.agent.uplink.publish(
            self.agent.topics.response(self.agent.config.agent_id, command), response
        )

    async def answer(self, command: str, payload: bytes, received_at: datetime) -> CommandResponse:
        """The response to one request (separate from publishing, for tests and the CLI)."""
        try:
            request = CommandRequest.model_validate_json(payload)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(x) for x in e['loc']) or 'payload'}: {e['msg']}" for e in exc.errors()
            )
            log.warning("malformed %s request: %s", command, problems)
            return CommandResponse(transaction=_transaction_of(payload), status="error", error=problems)
        handler = self._handlers.get(command)
        if handler is None:
            return CommandResponse(
                transaction=request.transaction,
                status="error",
                error=f"unknown command {command!r}; known: {', '.join(COMMANDS)}",
            )
        try:
            data = await handler(request.data, received_at)
        except (CommandError, ValidationError) as exc:
            log.warning("%s failed: %s", command, exc, extra={"transaction": request.transaction})
            return CommandResponse(transaction=request.transaction, status="error", error=str(exc))
        return CommandResponse(transaction=request.transaction, status="ok", data=data)

    async def _time(self, data: dict[str, Any], received_at: datetime) -> dict[str, Any]:
        request = TimeRequestData.model_validate(data)
        return self.agent.clock.answer(request, received_at).model_dump(mode="json")

    async def _reload(self, data: dict[str, Any], received_at: datetime) -> dict[str, Any]:
        """Re-read the config file; modems are added, removed or restarted to match it. Changes
        to the agent id, broker or spool need a restart and are refused, changing nothing."""
        path = self.agent.config_path
        if path is None:
            raise CommandError("this agent was not started from a config file")
        try:
            new = await asyncio.to_thread(config_module.load, path)
        except config_module.ConfigError as exc:
            raise CommandError("config not reloaded: " + "; ".join(exc.problems)) from None
        old = self.agent.config
        fixed = [
            name
            for name in ("agent_id", "broker", "spool", "topic_prefix")
            if getattr(new, name) != getattr(old, name)
        ]
        if fixed:
            raise CommandError(f"config not reloaded: {', '.join(fixed)} changed; restart the agent for that")
        old_modems = {m.id: m for m in old.modems}
        new_modems = {m.id: m for m in new.modems}
        removed = [i for i in old_modems if i not in new_modems]
        added = [i for i in new_modems if i not in old_modems]
        changed = [i for i in new_modems if i in old_modems and new_modems[i] != old_modems[i]]
        for modem_id in removed + changed:
            await self.agent.remove_modem(modem_id)
        self.agent.config = new
        for modem_id in added + changed:
            await self.agent.add_modem(new_modems[modem_id])
        return {"added": added, "removed": removed, "restarted": changed}

    def _runner(self, data: dict[str, Any]) -> Any:
        modem_id = data.get("modem")
        if not isinstance(modem_id, str) or modem_id not in self.agent.modems:
            raise CommandError(f"unknown modem {modem_id!r}; known: {', '.join(self.agent.modems)}")
        return self.agent.modems[modem_id]

    async def _modem_reset(self, data: dict[str, Any], received_at: datetime) -> dict[str, Any]:
        """Soft reset (close, reopen, re-initialise); if the modem is still not up, run the
        configured hard-reset command (a USB power cycle) and reopen again."""
        runner = self._runner(data)
        modem_id = runner.config.id
        steps = ["soft"]
        await self.agent.remove_modem(modem_id)
        runner = await self.agent.add_modem(runner.config)
        up = await runner.port.wait_connected(RESET_WAIT_S)
        command = runner.config.hard_reset_command
        if not up and command:
            steps.append("hard")
            await self.agent.remove_modem(modem_id)
            try:
                result = await asyncio.to_thread(
                    subprocess.run, command, capture_output=True, text=True, timeout=HARD_RESET_TIMEOUT_S
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                runner = await self.agent.add_modem(runner.config)
                raise CommandError(f"hard reset command failed: {exc}") from None
            if result.returncode != 0:
                log.warning(
                    "hard reset of %s exited %d: %s", modem_id, result.returncode, result.stderr.strip()
                )
            runner = await self.agent.add_modem(runner.config)
            up = await runner.port.wait_connected(RESET_WAIT_S)
        state = await runner.publish_state(force=True)
        return {"modem": modem_id, "steps": steps, "connected": up, "state": state.model_dump(mode="json")}

    async def _rescan(self, data: dict[str, Any], received_at: datetime) -> dict[str, Any]:
        """Reopen every modem that is not connected; report all."""
        reopened = []
        for modem_id, runner in list(self.agent.modems.items()):
            if not (await runner.port.state()).connected:
                await self.agent.remove_modem(modem_id)
                await self.agent.add_modem(runner.config)
                reopened.append(modem_id)
        states = {}
        for modem_id, runner in self.agent.modems.items():
            states[modem_id] = (await runner.publish_state(force=True)).model_dump(mode="json")
        return {"reopened": reopened, "modems": states}

    async def _storage(self, data: dict[str, Any], received_at: datetime) -> dict[str, Any]:
        """SIM storage use of one modem (``data.modem``) or of all."""
        runners = [self._runner(data)] if "modem" in data else list(self.agent.modems.values())
        out = {}
        for runner in runners:
            state = await runner.port.state(refresh=True)
            out[runner.config.id] = {
                "memory": state.storage_memory,
                "used": state.storage_used,
                "total": state.storage_total,
            }
        return {"storage": out}


def _transaction_of(payload: bytes) -> str | None:
    """The transaction id of a request that failed validation, when it can still be read."""
    import json

    try:
        value = json.loads(payload)
    except ValueError:
        return None
    transaction = value.get("transaction") if isinstance(value, dict) else None
    return transaction if isinstance(transaction, str) else None
