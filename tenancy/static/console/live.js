// The live view: lines pushed by /console/live/ws/ (tenancy/console/live.py), newest first.
(function () {
  "use strict";
  var body = document.getElementById("live-lines");
  var status = document.getElementById("live-status");
  var empty = document.getElementById("live-empty");
  if (!body) { return; }
  var KEEP = 200;
  var retry = 1000;

  function cell(row, text, numeric) {
    var td = document.createElement("td");
    if (numeric) { td.className = "num"; }
    td.textContent = text === null || text === undefined ? "–" : String(text);
    row.appendChild(td);
    return td;
  }

  function add(line) {
    var row = document.createElement("tr");
    cell(row, line.at.slice(0, 19).replace("T", " "));
    var idCell = document.createElement("td");
    var link = document.createElement("a");
    link.href = "/console/requests/" + encodeURIComponent(line.request_id) + "/";
    var code = document.createElement("code");
    code.textContent = line.request_id;
    link.appendChild(code);
    idCell.appendChild(link);
    row.appendChild(idCell);
    cell(row, line.key ? line.key + "…" : null);
    cell(row, line.model || null);
    cell(row, line.status, true);
    cell(row, line.outcome);
    cell(row, line.tokens, true);
    cell(row, line.latency_ms, true);
    body.insertBefore(row, body.firstChild);
    while (body.children.length > KEEP) { body.removeChild(body.lastChild); }
    if (empty) { empty.hidden = true; }
  }

  function connect() {
    var scheme = window.location.protocol === "https:" ? "wss://" : "ws://";
    var socket = new WebSocket(scheme + window.location.host + "/console/live/ws/");
    socket.onopen = function () { status.textContent = "Connected: showing requests as they finish."; retry = 1000; };
    socket.onmessage = function (message) {
      var data = JSON.parse(message.data);
      (data.lines || []).forEach(add);
    };
    socket.onclose = function (event) {
      if (event.code === 4403) { status.textContent = "Not allowed: sign in again."; return; }
      status.textContent = "Disconnected; reconnecting…";
      setTimeout(connect, retry);
      retry = Math.min(retry * 2, 30000);
    };
  }
  connect();
}());
