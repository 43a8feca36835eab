// probe-fleet web UI: progressive enhancement only; every page works without it.
// Live updates arrive as server-sent events from /events. Everything received is put into the
// page as text (textContent), never as HTML.
"use strict";

(function () {
  const liveTables = document.querySelectorAll("[data-live-results]");
  const agents = document.querySelectorAll("[data-agent]");
  if (!liveTables.length && !agents.length) return;
  const state = document.getElementById("live-state");
  const source = new EventSource("/events");

  source.addEventListener("open", function () {
    if (state) { state.textContent = "live"; state.classList.add("on"); }
  });
  source.addEventListener("error", function () {
    if (state) { state.textContent = "reconnecting"; state.classList.remove("on"); }
  });

  function cell(row, text, className) {
    const td = document.createElement("td");
    td.textContent = text;
    if (className) td.className = className;
    row.appendChild(td);
    return td;
  }

  function ms(value) {
    if (value === null || value === undefined) return "-";
    return Math.abs(value) < 1000 ? value.toFixed(0) + " ms" : (value / 1000).toFixed(1) + " s";
  }

  source.addEventListener("result", function (event) {
    const result = JSON.parse(event.data);
    liveTables.forEach(function (table) {
      const route = table.getAttribute("data-route");
      const network = table.getAttribute("data-network");
      if (route && route !== result.route) return;
      if (network && network !== result.mcc_mnc) return;
      const body = table.tBodies[0];
      const row = document.createElement("tr");
      row.className = "live-new" + (result.delivered ? "" : " row-bad");
      row.setAttribute("data-test-case", String(result.test_case_id));
      cell(row, result.decided_at ? result.decided_at.replace("T", " ").slice(0, 19) + "Z" : "-");
      cell(row, result.route);
      cell(row, result.mcc_mnc);
      cell(row, result.delivered ? (result.late ? "late" : "delivered") : "not delivered");
      cell(row, ms(result.latency_ms), "num");
      cell(row, result.sender_received || "-");
      cell(row, (result.flags || []).join(", "));
      body.insertBefore(row, body.firstChild);
      const empty = table.querySelector("[data-empty]");
      if (empty) empty.remove();
      while (body.rows.length > 50) body.deleteRow(body.rows.length - 1);
    });
  });

  source.addEventListener("agent", function (event) {
    const agent = JSON.parse(event.data);
    document.querySelectorAll('[data-agent="' + CSS.escape(agent.id) + '"]').forEach(function (box) {
      const badge = box.querySelector("[data-agent-state]");
      if (badge) {
        badge.textContent = agent.state;
        badge.className = "badge state-" + agent.state;
      }
      const seen = box.querySelector("[data-agent-seen]");
      if (seen && agent.last_seen_at) {
        seen.textContent = "just now";
        seen.setAttribute("datetime", agent.last_seen_at);
      }
    });
  });
})();
