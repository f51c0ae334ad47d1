// tern's dashboard: what the page accepts from the broker, checked as tern/reports.py
// does (topics.md, JSON payloads): a size cap per kind, exactly the documented keys, each
// of the documented type. Anything else is refused with a reason, which the page counts.
"use strict";

window.ternChecks = (function () {
  const CAPS = { metrics: 65536, status: 4096, telemetry: 1024, view: 65536 };
  const MAX_UINT = 2 ** 53;
  const ID = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/;

  class Refused extends Error {
    constructor(reason) {
      super(reason);
      this.reason = reason;
    }
  }

  const isObj = (x) => x !== null && typeof x === "object" && !Array.isArray(x);
  const isUint = (x) => Number.isInteger(x) && x >= 0 && x <= MAX_UINT;
  const isInt = (x) => Number.isInteger(x) && Math.abs(x) <= MAX_UINT;
  const isNum = (x) => typeof x === "number" && Number.isFinite(x);
  const isText = (x, n) => typeof x === "string" && x.length <= n;
  const MAX_REASONS = 256;
  const isReason = (k) => k.length > 0 && k.length <= 64;
  const isTally = (x) =>
    isObj(x) &&
    Object.keys(x).length <= MAX_REASONS &&
    Object.keys(x).every(isReason) &&
    Object.values(x).every(isUint);
  const isId = (x) => typeof x === "string" && ID.test(x);

  function keys(v, required, optional) {
    if (!isObj(v)) throw new Refused("malformed");
    for (const k of required) if (!(k in v)) throw new Refused("malformed");
    for (const k of Object.keys(v)) {
      if (!required.includes(k) && !optional.includes(k)) throw new Refused("malformed");
    }
  }

  function check(ok) {
    if (!ok) throw new Refused("malformed");
  }

  function metrics(v) {
    const req = ["component", "round", "model_version", "contributors", "dropped"];
    const opt = ["rejected", "bytes_up", "bytes_down", "accuracy", "loss", "round_seconds", "failed"];
    keys(v, req, opt);
    check(isId(v.component));
    for (const k of ["round", "model_version", "contributors", "dropped", "bytes_up", "bytes_down"]) {
      check(!(k in v) || isUint(v[k]));
    }
    check(["rejected", "failed"].every((k) => !(k in v) || isTally(v[k])));
    const absent = (x) => x === undefined || x === null;
    check(absent(v.accuracy) || (isNum(v.accuracy) && v.accuracy >= 0 && v.accuracy <= 1));
    check(absent(v.loss) || (isNum(v.loss) && v.loss >= 0));
    check(v.round_seconds === undefined || (isNum(v.round_seconds) && v.round_seconds >= 0));
    return v;
  }

  const ACTIVITY = ["idle", "training", "sending"];

  const ROLES = ["coordinator", "gateway", "device", "board", "broker"];

  function status(v) {
    keys(v, ["id", "role", "state", "version"], ["detail", "activity", "last_round", "last_error"]);
    check(isId(v.id) && ROLES.includes(v.role) && isText(v.version, 64));
    check(v.state === "online" || v.state === "offline");
    check(v.detail === undefined || isText(v.detail, 500));
    check(v.activity === undefined || ACTIVITY.includes(v.activity));
    check(v.last_round === undefined || isUint(v.last_round));
    check(v.last_error === undefined || isText(v.last_error, 200));
    return v;
  }

  function reading(t) {
    keys(t, ["label", "confidence", "latency_us", "model_version", "seq"], []);
    check(["label", "latency_us", "model_version", "seq"].every((k) => isInt(t[k])));
    check(isNum(t.confidence) && t.confidence >= 0 && t.confidence <= 1);
    return t;
  }

  function telemetry(v) {
    keys(v, ["device", "label", "confidence", "latency_us", "model_version", "seq"], []);
    check(isId(v.device));
    const { device, ...rest } = v;
    reading(rest);
    return v;
  }

  function member(m) {
    keys(m, ["role", "state"], ["activity", "last_round", "last_error", "telemetry"]);
    check(["device", "board", "gateway"].includes(m.role));
    check(["online", "offline", "unknown"].includes(m.state));
    check(m.activity === undefined || ACTIVITY.includes(m.activity));
    check(m.last_round === undefined || isUint(m.last_round));
    check(m.last_error === undefined || isText(m.last_error, 200));
    if (m.telemetry !== undefined) reading(m.telemetry);
    return m;
  }

  function view(v) {
    keys(v, ["gateway", "parent", "at", "round", "members"], ["omitted"]);
    check(isId(v.gateway) && isId(v.parent) && isNum(v.at) && v.at >= 0 && v.at < 1e11);
    check(v.round === null || isUint(v.round));
    check(v.omitted === undefined || isUint(v.omitted));
    check(isObj(v.members) && Object.keys(v.members).length <= 256);
    for (const [id, m] of Object.entries(v.members)) {
      check(isId(id));
      member(m);
    }
    return v;
  }

  const PARSERS = { metrics, status, telemetry, view };
  const decoder = new TextDecoder("utf-8", { fatal: true });
  const OWNER = { metrics: "component", status: "id", telemetry: "device", view: "gateway" };
  // One payload as the page takes it: the parsed value, or Refused with a reason.
  function parse(kind, sender, payload) {
    if (!(kind in PARSERS)) throw new Refused("unwatched");
    if (payload.length > CAPS[kind]) throw new Refused("oversize");
    let value;
    try {
      value = JSON.parse(decoder.decode(payload));
    } catch (e) {
      throw new Refused("malformed");
    }
    value = PARSERS[kind](value);
    if (value[OWNER[kind]] !== sender) throw new Refused("mismatch");
    return value;
  }

  return Object.freeze({ parse, isId, Refused });
})();
