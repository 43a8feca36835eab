"""The bundled sender: route connectors (SMPP, HTTP), numbers, routing decisions, the send API."""
