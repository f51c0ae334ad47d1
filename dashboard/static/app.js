// tern's dashboard: subscribes to a fleet's JSON topics over MQTT-over-WebSockets and
// draws them. Every payload from the broker is hostile: each message is size-capped,
// parsed in a try/catch, checked field by field against topics.md (as tern.reports
// does), and only ever written into the page as text (textContent, never innerHTML).
"use strict";

(function () {
  const { parse, isId, Refused } = window.ternChecks;
  const WATCHED = ["metrics", "status", "telemetry", "view"];
  const MAX_ROUNDS = 10000;
  const MAX_MEMBERS = 10000;
  const COORDINATOR = "coordinator";

  const state = {
    fleet: "",
    rounds: new Map(), // round -> coordinator metrics
    gateways: new Map(), // gateway -> its last metrics
    statuses: new Map(),
    views: new Map(),
    telemetry: new Map(),
    refused: {},
    messages: 0,
  };

  // -- input ------------------------------------------------------------------------
  function keep(table, key, value) {
    if (!table.has(key) && table.size >= MAX_MEMBERS) throw new Refused("full");
    table.set(key, value);
  }

  function take(topic, payload) {
    const parts = topic.split("/");
    if (parts.length !== 4 || parts[0] !== "tern" || parts[1] !== state.fleet) {
      throw new Refused("bad_topic");
    }
    const kind = parts[2];
    const sender = parts[3];
    if (!WATCHED.includes(kind)) throw new Refused("unwatched");
    if (!isId(sender)) throw new Refused("bad_topic");
    const table = { status: state.statuses, view: state.views, telemetry: state.telemetry }[kind];
    if (payload.length === 0) {
      // a retained message cleared
      (table || (sender === COORDINATOR ? new Map() : state.gateways)).delete(sender);
      return;
    }
    const value = parse(kind, sender, payload);
    if (kind !== "metrics") {
      keep(table, sender, value);
    } else if (sender !== COORDINATOR) {
      keep(state.gateways, sender, value);
    } else {
      const last = Math.max(-1, ...state.rounds.keys());
      if (value.round < last) state.rounds.clear(); // a new run of the coordinator
      state.rounds.set(value.round, value);
      while (state.rounds.size > MAX_ROUNDS) state.rounds.delete(Math.min(...state.rounds.keys()));
    }
  }

  function feed(topic, payload) {
    try {
      take(topic, payload);
      state.messages += 1;
    } catch (e) {
      const reason = e instanceof Refused ? e.reason : "error";
      state.refused[reason] = (state.refused[reason] || 0) + 1;
    }
    schedule();
  }

  // -- drawing (text only) ----------------------------------------------------------
  function el(tag, text, cls) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (cls) node.className = cls;
    return node;
  }

  const fixed = (x, n) => (x === null || x === undefined ? "-" : Number(x).toFixed(n));
  const kib = (n) => (n === undefined ? "-" : (n / 1024).toFixed(1) + " KiB");
  const tally = (t) =>
    Object.entries(t || {})
      .sort()
      .map(([k, n]) => k + " " + n)
      .join(", ") || "-";

  function sortedRounds() {
    return [...state.rounds.values()].sort((a, b) => a.round - b.round);
  }

  function drawRounds(rounds) {
    const body = document.querySelector("#rounds tbody");
    const longest = Math.max(1e-9, ...rounds.map((m) => m.round_seconds || 0));
    const rows = rounds.slice(-200).reverse().map((m) => {
      const tr = el("tr", null, "round");
      tr.dataset.round = String(m.round);
      tr.dataset.accuracy = m.accuracy === null || m.accuracy === undefined ? "" : String(m.accuracy);
      tr.append(
        el("td", m.round),
        el("td", fixed(m.accuracy, 3)),
        el("td", fixed(m.loss, 3)),
        el("td", m.contributors),
        el("td", m.dropped),
        el("td", tally(m.rejected), "text"),
        el("td", kib(m.bytes_up)),
        el("td", kib(m.bytes_down)),
        el("td", fixed(m.round_seconds || 0, 2)),
      );
      const bar = el("div", null, "bar");
      bar.style.width = (100 * (m.round_seconds || 0)) / longest + "%";
      const cell = el("td");
      cell.append(bar);
      tr.append(cell);
      return tr;
    });
    body.replaceChildren(...rows);
    const last = rounds[rounds.length - 1];
    document.getElementById("summary").textContent = last
      ? `round ${last.round}: accuracy ${fixed(last.accuracy, 3)}, loss ${fixed(last.loss, 3)}, ` +
        `${last.contributors} contributors, ${last.dropped} dropped, ${fixed(last.round_seconds || 0, 2)} s` +
        (typeof last.epsilon === "number" ? `, epsilon ${fixed(last.epsilon, 3)}` : "")
      : "no round closed yet";
    document.body.dataset.rounds = String(rounds.length);
    document.body.dataset.lastRound = last ? String(last.round) : "";
  }

  function drawGateways() {
    const body = document.querySelector("#gateways tbody");
    const rows = [...state.gateways.entries()].sort().map(([id, m]) => {
      const tr = el("tr");
      tr.dataset.gateway = id;
      tr.append(
        el("td", id),
        el("td", m.round),
        el("td", m.contributors),
        el("td", m.dropped),
        el("td", tally(m.rejected), "text"),
        el("td", tally(m.failed), "text"),
      );
      return tr;
    });
    body.replaceChildren(...rows);
  }

  function node(id, role, info) {
    const s = state.statuses.get(id);
    const own = state.telemetry.get(id);
    const src = s || info || {};
    return {
      id,
      role,
      state: src.state || "unknown",
      activity: src.activity,
      last_round: src.last_round,
      why: [src.last_error, s && s.detail].filter((x) => x),
      telemetry: own || (info && info.telemetry),
      children: [],
    };
  }

  function tree() {
    const gateways = new Set([...state.views.keys(), ...state.gateways.keys()]);
    for (const s of state.statuses.values()) if (s.role === "gateway") gateways.add(s.id);
    const parent = new Map();
    for (const g of gateways) parent.set(g, state.views.has(g) ? state.views.get(g).parent : COORDINATOR);
    for (const v of state.views.values()) {
      for (const [m, info] of Object.entries(v.members)) {
        if (info.role === "gateway" && !state.views.has(m)) {
          gateways.add(m);
          parent.set(m, v.gateway);
        }
      }
    }
    const placed = new Set([COORDINATOR, ...gateways]);
    const build = (g, seen) => {
      const n = node(g, "gateway");
      const v = state.views.get(g);
      for (const c of [...gateways].sort()) {
        if (parent.get(c) === g && !seen.has(c)) n.children.push(build(c, new Set([...seen, c])));
      }
      if (v) {
        for (const m of Object.keys(v.members).sort()) {
          if (parent.has(m)) continue;
          placed.add(m);
          n.children.push(node(m, v.members[m].role, v.members[m]));
        }
      }
      return n;
    };
    const root = node(COORDINATOR, "coordinator");
    for (const g of [...gateways].sort()) {
      if (!parent.has(parent.get(g))) root.children.push(build(g, new Set([g])));
    }
    for (const s of [...state.statuses.values()].sort((a, b) => (a.id < b.id ? -1 : 1))) {
      if (!placed.has(s.id)) root.children.push(node(s.id, s.role));
    }
    for (const d of [...state.telemetry.keys()].sort()) {
      if (!placed.has(d) && !state.statuses.has(d)) root.children.push(node(d, "board"));
    }
    return root;
  }

  function drawNode(n) {
    const li = el("li");
    li.dataset.member = n.id;
    li.dataset.state = n.state;
    li.append(el("span", n.id, "id"), el("span", n.role, "role"), el("span", n.state, "state-" + n.state));
    const extra = [];
    if (n.activity) extra.push(n.activity);
    if (n.last_round !== undefined) extra.push("round " + n.last_round);
    const t = n.telemetry;
    if (t) extra.push(`v${t.model_version} label ${t.label} (${fixed(t.confidence, 2)}) ${t.latency_us} us`);
    if (extra.length) li.append(el("span", extra.join(", "), "extra"));
    for (const why of n.why) li.append(el("span", "(" + why + ")", "why"));
    if (n.children.length) {
      const ul = el("ul");
      ul.append(...n.children.map(drawNode));
      li.append(ul);
    }
    return li;
  }

  function drawTelemetry() {
    const body = document.querySelector("#telemetry tbody");
    const rows = [...state.telemetry.values()]
      .sort((a, b) => (a.device < b.device ? -1 : 1))
      .map((t) => {
        const tr = el("tr");
        tr.dataset.board = t.device;
        tr.append(
          el("td", t.device),
          el("td", "v" + t.model_version),
          el("td", t.label),
          el("td", fixed(t.confidence, 3)),
          el("td", t.latency_us + " us"),
          el("td", t.seq),
        );
        return tr;
      });
    body.replaceChildren(...rows);
  }

  // -- plots (uPlot) ----------------------------------------------------------------
  const plots = {};

  const ROUND_TICKS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000];

  function plot(id, series, scales, axes, data) {
    const box = document.getElementById(id);
    const width = Math.max(300, box.clientWidth || 480);
    if (!plots[id]) {
      plots[id] = new uPlot(
        { width, height: 220, scales: { x: { time: false }, ...scales }, series: [{ label: "round" }, ...series], axes },
        data,
        box,
      );
    } else {
      plots[id].setData(data);
    }
  }

  function drawPlots(rounds) {
    if (typeof uPlot === "undefined") return;
    const x = rounds.map((m) => m.round);
    const nul = (v) => (v === undefined ? null : v);
    plot(
      "accuracy-plot",
      [
        { label: "accuracy", stroke: "#1a7f37", scale: "acc" },
        { label: "loss", stroke: "#cf222e", scale: "loss" },
      ],
      { acc: { range: [0, 1] }, loss: {} },
      [{ incrs: ROUND_TICKS }, { scale: "acc" }, { scale: "loss", side: 1, grid: { show: false } }],
      [x, rounds.map((m) => nul(m.accuracy)), rounds.map((m) => nul(m.loss))],
    );
    plot(
      "bytes-plot",
      [
        { label: "up (KiB)", stroke: "#0969da" },
        { label: "down (KiB)", stroke: "#8250df" },
      ],
      {},
      [{ incrs: ROUND_TICKS }, {}],
      [x, rounds.map((m) => (m.bytes_up || 0) / 1024), rounds.map((m) => (m.bytes_down || 0) / 1024)],
    );
  }

  let pending = false;

  function draw() {
    pending = false;
    const rounds = sortedRounds();
    for (const step of [
      () => drawRounds(rounds),
      drawGateways,
      () => document.getElementById("tree").replaceChildren(drawNode(tree())),
      drawTelemetry,
      () => drawPlots(rounds),
    ]) {
      try {
        step();
      } catch (e) {
        console.error("tern dashboard: drawing failed", e);
      }
    }
    document.getElementById("counts").textContent = `${state.messages} messages`;
    document.getElementById("refused").textContent = "refused: " + tally(state.refused);
  }

  function schedule() {
    if (!pending) {
      pending = true;
      setTimeout(draw, 200);
    }
  }

  function connection(text, cls) {
    const c = document.getElementById("connection");
    c.textContent = text;
    c.className = "conn conn-" + cls;
    document.body.dataset.connection = cls;
  }

  async function start() {
    const config = await (await fetch("config.json", { cache: "no-store" })).json();
    state.fleet = config.fleet;
    document.getElementById("fleet").textContent = config.fleet;
    const options = {
      clientId: config.client_id + "-" + Math.random().toString(16).slice(2, 10),
      protocolVersion: 4,
      clean: true,
      reconnectPeriod: 2000,
      connectTimeout: 10000,
    };
    if (config.username) {
      options.username = config.username;
      options.password = config.password;
    }
    const client = mqtt.connect(config.broker, options);
    client.on("connect", () => {
      connection("online", "online");
      client.subscribe(config.filters, { qos: 1 }, (err) => {
        document.body.dataset.subscribed = err ? "no" : "yes";
      });
    });
    client.on("reconnect", () => connection("reconnecting", "connecting"));
    client.on("offline", () => {
      connection("offline", "offline");
      document.body.dataset.subscribed = "no";
    });
    client.on("error", (e) => connection("error: " + (e && e.message ? e.message : "?"), "error"));
    client.on("message", (topic, payload) => feed(String(topic), payload));
    draw();
  }

  start().catch((e) => connection("cannot start: " + e, "error"));
  window.ternDashboard = { state, feed }; // for tests and the curious: read-only use
})();
