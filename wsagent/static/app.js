// wsagent's browser client: plain JavaScript, no build step.
// Model output only ever reaches the page through textContent, so a model cannot inject HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const MARKS = { thinking: "💭", action: "🔧", observation: "👁" };
// Refusals of a person's answer to an approval request: errors without seq that leave the run going.
const ANSWER_REFUSALS = new Set(["unknown_call", "already_answered", "run_ended"]);
// Requests that name a run this page holds the key to: their refusals (errors without seq) say which run, not
// which request. Each goes out followed by a ping; the server takes a socket's messages in order and
// refuses at once, so a refusal that comes before that ping's pong is that request's, and a pong that
// comes first means it was taken.
const TRACKED = new Set(["approve", "steer", "cancel", "resume"]);
// Close codes that mean "no": connecting again cannot change the answer (a slow client's 4008 can).
const REFUSED = new Set([1002, 1003, 1007, 1008, 1009, 1010, 4001, 4003, 4009, 4029]);
const refused = (code) => REFUSED.has(code) || (code >= 4000 && code < 5000 && code !== 4008);

const state = {
  ws: null,
  wanted: true,        // reconnect when the socket drops
  attempt: 0,          // reconnects since the server last sent anything (or kept the socket open a while)
  openedAt: 0,
  runs: new Map(),     // run id -> view (only runs still streaming)
  queue: [],           // views of prompts sent while not connected: they go out once connected
  counter: 0,
  started: 0,          // start events seen: the order in which runs started
  asked: [],           // tracked requests sent on this socket whose pong has not come yet, oldest first
};

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function setStatus(kind, text) {
  const status = $("status");
  status.dataset.state = kind;
  status.textContent = text;
}

function url() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}${$("route").value}`;
}

function connect() {
  const token = $("token").value.trim();
  // The token travels as a subprotocol entry, never in the URL (which ends up in logs and history).
  const protocols = token ? ["wsagent", `bearer.${token}`] : ["wsagent"];
  const ws = new WebSocket(url(), protocols);
  state.ws = ws;
  state.asked = [];
  setStatus(state.attempt ? "reconnecting" : "connecting", state.attempt ? "reconnecting…" : "connecting…");
  ws.onopen = () => {
    if (state.ws !== ws) return;  // given up on already (a reconnect while it was connecting)
    // The backoff is not reset here: a server that takes the connection and closes it at once would be
    // flooded. Data from the server resets it, and so does a connection that stayed open a while.
    state.openedAt = Date.now();
    setStatus("open", "connected");
    for (const [id, view] of state.runs) {
      post(view, { type: "resume", id, key: view.key, after: view.seq });
      // An answer sent on the old socket may have been lost: the replay shows it if it was taken, and the
      // card can be answered again if not. (A steer that was taken shows when its steer event comes.)
      for (const card of view.cards.values()) if (!card.settled) ready(card, "");
    }
    const queued = state.queue;
    state.queue = [];
    for (const view of queued) start(view);
  };
  ws.onmessage = (message) => {
    state.attempt = 0;
    handle(JSON.parse(message.data), state.ws === ws);
  };
  ws.onclose = (event) => {
    if (state.ws !== ws) return;
    state.ws = null;
    state.asked = [];
    requeue();
    const why = event.reason ? `${event.code} ${event.reason}` : `${event.code}`;
    if (refused(event.code)) {
      // The server said no (a bad token, a forbidden route, a limit): say why, and wait for the person.
      setStatus("closed", `refused: ${why}`);
      return;
    }
    if (!state.wanted) {
      setStatus("closed", `disconnected (${why})`);
      return;
    }
    if (state.openedAt && Date.now() - state.openedAt > 10000) state.attempt = 0;
    state.openedAt = 0;
    const delay = Math.min(8000, 250 * 2 ** state.attempt) * (0.5 + Math.random() / 2);
    state.attempt += 1;
    setStatus("reconnecting", `connection lost (${why}); reconnecting in ${(delay / 1000).toFixed(1)}s…`);
    setTimeout(connect, delay);
  };
}

// Runs sent on a socket that closed before they started (no start event, so no key to resume them with):
// the server never took them (a refusal closes the socket before reading it), so they go out again.
function requeue() {
  const unstarted = [];
  for (const [id, view] of state.runs) {
    if (view.key === undefined) {
      state.runs.delete(id);
      unstarted.push(view);
    }
  }
  for (const view of unstarted) waiting(view);
  state.queue = [...unstarted, ...state.queue];
}

function reconnect() {
  if (state.ws) {
    const old = state.ws;
    state.ws = null;
    old.close(1000);
    requeue();
  }
  state.attempt = 0;
  connect();
}

function agentView(view, agent) {
  if (!agent) return view.main;
  let part = view.agents.get(agent);
  if (!part) {
    const box = el("div", "assistant");
    box.append(el("div", "agent-name", agent));
    part = panel(box);
    view.agents.set(agent, part);
    view.turn.insertBefore(box, view.main.box);
  }
  return part;
}

function panel(box) {
  const steps = el("details", "steps");
  steps.append(el("summary", null, "thoughts"));
  steps.hidden = true;
  const answer = el("div", "answer");
  const meta = el("div", "meta");
  box.append(steps, answer, meta);
  return { box, steps, answer, meta, step: null, stepKind: null };
}

function addStep(part, kind, text, isError) {
  part.steps.hidden = false;
  if (kind === "thinking" && part.stepKind === "thinking" && part.step) {
    part.step.textContent += text;
    return;
  }
  part.step = el("div", `step ${kind}${isError ? " error" : ""}`, `${MARKS[kind] || ""} ${text}`);
  part.stepKind = kind;
  part.steps.append(part.step);
}

// A message about one of this page's runs, on the current socket: a tracked one (see TRACKED) waits for its
// pong, or its refusal.
function post(view, message, entry = {}) {
  state.ws.send(JSON.stringify(message));
  if (!TRACKED.has(message.type)) return;
  state.asked.push({ ...entry, kind: message.type, id: message.id, view, refused: false });
  state.ws.send(JSON.stringify({ type: "ping" }));
}

// `current`: the event came on the page's current socket (the tracked requests are that socket's).
function handle(event, current = true) {
  if (event.type === "pong") {
    if (current) taken(state.asked.shift());
    return;
  }
  const view = state.runs.get(event.id);
  if (!view) return;
  if (typeof event.seq === "number") {
    if (event.seq <= view.seq) return;   // already shown before a reconnect
    view.seq = event.seq;
  } else if (event.type === "error") {
    const entry = current ? state.asked.find((asked) => !asked.refused) : undefined;
    if (entry && entry.id === event.id) entry.refused = true;
    if (entry?.refused && entry.kind === "approve") {
      refusedAnswer(view, event, entry.card);
    } else if (entry?.refused && entry.kind === "steer") {
      refusedSteer(view, event, entry.steer);
    } else if (ANSWER_REFUSALS.has(event.code)) {
      refusedAnswer(view, event, undefined);
    } else {
      finish(view, event.id, `error: ${event.message}`, true);
    }
    return;
  }
  if (event.type === "start") {
    view.key = event.key;  // proves the run is ours when resuming it on a new connection
    state.started += 1;
    view.started = state.started;
    offerSteer();
    // Shown so that a person can watch this run from another client: attach with its id and key.
    const ref = el("div", "run-ref", `run ${event.id} · key ${event.key}`);
    ref.title = JSON.stringify({ type: "attach", id: event.id, key: event.key });
    view.turn.append(ref);
    return;
  }
  const part = agentView(view, event.workflow ? event.agent : null);
  switch (event.type) {
    case "token":
    case "answer":
    case "refusal":
      part.answer.textContent += event.content;
      part.stepKind = null;
      break;
    case "thinking":
    case "action":
    case "observation":
      addStep(part, event.type, event.content, event.is_error);
      break;
    case "tool_call":
      addStep(part, "action", `${event.name}(${event.arguments})`);
      break;
    case "snapshot":
      for (const agent of event.agents) agentView(view, agent.agent).answer.textContent = agent.content;
      break;
    case "agent_end":
      part.meta.textContent = event.outcome;
      break;
    case "approval_request":
      askApproval(view, part, event);
      break;
    case "approval":
      settle(view, part, event);
      break;
    case "steer":
      steered(view, part, event);
      break;
    case "usage":
      // A workflow's agents each report their own usage: the footer shows the sum.
      view.tokens = (view.tokens || 0) + event.total_tokens;
      view.estimated = view.estimated || event.estimated;
      view.usage = `${view.tokens} tokens${view.estimated ? " (estimated)" : ""}`;
      break;
    case "done":
      finish(view, event.id, `done (${event.finish_reason}) · ${view.usage || ""}`, false);
      break;
    case "cancelled":
      finish(view, event.id, `cancelled: ${event.reason}`, false);
      break;
    case "error":
      finish(view, event.id, `error: ${event.message}`, true);
      break;
  }
  $("log").scrollTop = $("log").scrollHeight;
}

// An approval request: a card with the call and two buttons, one per call (a request replayed after a
// reconnect finds its card there already).
function askApproval(view, part, event) {
  if (view.cards.has(event.call_id)) return;
  const card = approvalCard(view, part, event.call_id, event.name);
  card.box.append(el("pre", "approval-args", prettyArguments(event.arguments)));
  const approve = el("button", "approve", "Approve");
  const deny = el("button", "deny", "Deny");
  approve.type = deny.type = "button";
  const reason = el("input", "approval-reason");
  reason.placeholder = "reason (optional, sent with Deny)";
  reason.maxLength = 1000;
  approve.addEventListener("click", () => answer(view, card, true, ""));
  deny.addEventListener("click", () => answer(view, card, false, reason.value.trim()));
  card.actions = el("div", "approval-actions");
  card.actions.append(approve, deny, reason);
  card.box.append(card.actions, card.outcome);
  card.box.scrollIntoView({ block: "nearest" });
}

function approvalCard(view, part, callId, name) {
  const box = el("div", "approval");
  box.dataset.call = callId;
  box.dataset.state = "pending";
  const title = el("div", "approval-title", "⏸ ");
  title.append(el("code", null, name || `call ${callId}`), " asks for approval");
  box.append(title);
  part.box.insertBefore(box, part.answer);
  const card = { box, callId, actions: null, outcome: el("div", "approval-outcome"), settled: false };
  view.cards.set(callId, card);
  return card;
}

// Arguments come as a JSON string: shown indented when they parse, as they came when not.
function prettyArguments(text) {
  try {
    return JSON.stringify(JSON.parse(text), null, 2);
  } catch {
    return String(text);
  }
}

function answer(view, card, approved, reason) {
  if (!state.ws || state.ws.readyState !== WebSocket.OPEN) {
    card.outcome.textContent = "not connected: answer again once connected";
    return;
  }
  const message = { type: "approve", id: view.request.id, key: view.key, call_id: card.callId, approved };
  if (!approved && reason) message.reason = reason;
  post(view, message, { card });
  for (const button of card.actions.querySelectorAll("button")) button.disabled = true;
  card.outcome.textContent = approved ? "approving…" : "denying…";
}

function ready(card, text) {
  if (card.actions) for (const button of card.actions.querySelectorAll("button")) button.disabled = false;
  card.outcome.textContent = text;
}

// How a request was answered, by this page or by anyone else who may: the card says so, its buttons go.
function settle(view, part, event) {
  const card = view.cards.get(event.call_id) || approvalCard(view, part, event.call_id, null);
  card.settled = true;
  if (card.actions) card.actions.remove();
  card.box.dataset.state = event.approved ? "approved" : "denied";
  card.outcome.textContent = event.approved ? "approved" : `denied${event.reason ? `: ${event.reason}` : ""}`;
  if (!card.outcome.isConnected) card.box.append(card.outcome);
}

// A refused answer: said in the run's view; the card it was for (if this page sent it) can be answered again.
function refusedAnswer(view, event, card) {
  notice(view, event);
  if (card && !card.settled) ready(card, `refused: ${event.code}`);
}

function notice(view, event) {
  view.main.box.insertBefore(el("div", "notice error", `refused: ${event.code}: ${event.message}`), view.main.answer);
}

// A tracked request's pong: taken, unless it was refused first.
function taken(entry) {
  if (!entry || entry.refused || entry.kind !== "steer") return;
  if (entry.steer.state === "sending") entry.steer.state = entry.steer.note.dataset.state = "queued";
}

// The agent or workflow run that the Steer button speaks to: the most recently started of those this page
// started that still stream.
function steerTarget() {
  let target = null;
  for (const view of state.runs.values()) {
    const agentRun = view.request.agent !== undefined || view.request.workflow !== undefined;
    if (agentRun && view.key !== undefined && (!target || view.started > target.started)) target = view;
  }
  return target;
}

function offerSteer() {
  const target = steerTarget();
  const button = $("steer");
  button.hidden = !target;
  button.title = target ? `send the text to run ${target.request.id}, for its agent's next step` : "";
}

// Steer: the prompt box's text goes to the running agent; its view shows it pending until the server's steer
// event says whether the agent took it.
function steer() {
  const view = steerTarget();
  const content = $("prompt").value.trim();
  if (!view || !content) return;
  if (!state.ws || state.ws.readyState !== WebSocket.OPEN) {
    view.main.box.insertBefore(el("div", "notice error", "not connected: steer again once connected"),
                               view.main.answer);
    return;
  }
  const note = el("div", "steer", `✉ steer sent: “${content}”`);
  note.dataset.state = "sending";
  view.main.box.insertBefore(note, view.main.answer);
  const pending = { content, note, state: "sending" };
  view.steers.push(pending);
  post(view, { type: "steer", id: view.request.id, key: view.key, content }, { steer: pending });
  $("prompt").value = "";
  $("prompt").focus();
}

function refusedSteer(view, event, pending) {
  notice(view, event);
  pending.state = pending.note.dataset.state = "refused";
  pending.note.textContent = `✉ steer not taken: “${pending.content}” (refused: ${event.code})`;
}

// The server's word on a steering message: it updates this page's note for it (the oldest one with that text
// still waiting), or shows as a note of its own (another client's).
function steered(view, part, event) {
  const pending = view.steers.find((s) => waitingSteer(s) && s.content === event.content);
  const note = pending ? pending.note : el("div", "steer");
  note.textContent = steerText(event);
  note.dataset.state = event.delivered ? "delivered" : "undelivered";
  if (pending) pending.state = note.dataset.state;
  else part.box.insertBefore(note, part.answer);
}

const waitingSteer = (pending) => pending.state === "sending" || pending.state === "queued";

function steerText(event) {
  const said = `✉ steer: “${event.content}”`;
  if (event.delivered) return `${said} (delivered)`;
  return `${said} (not delivered${event.reason ? `: ${event.reason}` : ""})`;
}

function finish(view, id, text, isError) {
  for (const card of view.cards.values()) {
    if (card.settled) continue;
    if (card.actions) card.actions.remove();
    card.box.dataset.state = "void";
    card.outcome.textContent = "not answered: the run ended";
  }
  // A steer the server took always has its steer event before the run's end: these never reached the run.
  for (const pending of view.steers) {
    if (!waitingSteer(pending)) continue;
    pending.state = pending.note.dataset.state = "undelivered";
    pending.note.textContent = `✉ steer: “${pending.content}” (not delivered: no word from the server)`;
  }
  view.main.meta.textContent = text;
  view.main.meta.classList.toggle("error", isError);
  view.turn.dataset.outcome = text.split(/[ :]/)[0];
  state.runs.delete(id);
  $("stop").disabled = state.runs.size === 0 && state.queue.length === 0;
  offerSteer();
}

function waiting(view) {
  view.main.meta.textContent = "waiting for the connection: sent once connected";
}

function start(view) {
  view.main.meta.textContent = "";
  state.runs.set(view.request.id, view);
  state.ws.send(JSON.stringify(view.request));
}

// A prompt is never dropped: without a connection it waits in the log, and goes out once connected.
function send(prompt) {
  state.counter += 1;
  const id = `web-${Date.now().toString(36)}-${state.counter}`;
  const turn = el("div", "turn");
  turn.dataset.run = id;
  turn.append(el("div", "user", prompt));
  const box = el("div", "assistant");
  turn.append(box);
  $("log").append(turn);
  const request = { type: "run", id, prompt };
  const mode = $("mode").value;
  if (mode.startsWith("agent:")) request.agent = mode.slice(6);
  if (mode.startsWith("workflow:")) request.workflow = mode.slice(9);
  const view = { turn, main: panel(box), agents: new Map(), seq: 0, usage: "", request, cards: new Map(),
                 steers: [], started: 0 };
  if (state.ws && state.ws.readyState === WebSocket.OPEN) {
    start(view);
  } else {
    waiting(view);
    state.queue.push(view);
  }
  $("stop").disabled = false;
}

function stop() {
  for (const [id, view] of state.runs) {
    if (state.ws && state.ws.readyState === WebSocket.OPEN) {
      post(view, { type: "cancel", id, key: view.key });
    }
  }
  const queued = state.queue;
  state.queue = [];
  for (const view of queued) finish(view, view.request.id, "cancelled: not sent", false);
}

// The Run menu: the model, then the server's agents (the built-in assistant and those of --agents), then its
// workflows. The assistant is in the page already: it stays if the server cannot be asked.
async function names(path) {
  try {
    const response = await fetch(path);
    return await response.json();
  } catch (error) {
    console.warn(`no list at ${path}`, error);
    return [];
  }
}

async function loadMenu() {
  const [agents, workflows] = await Promise.all([names("/agents"), names("/workflows")]);
  const mode = $("mode");
  let last = mode.querySelector('option[value="agent:assistant"]');
  for (const name of agents) {
    if (mode.querySelector(`option[value="agent:${CSS.escape(name)}"]`)) continue;
    const option = el("option", null, `${name} agent`);
    option.value = `agent:${name}`;
    if (last) last.after(option); else mode.append(option);
    last = option;
  }
  for (const name of workflows) {
    const option = el("option", null, `workflow: ${name}`);
    option.value = `workflow:${name}`;
    mode.append(option);
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const prompt = $("prompt").value.trim();
  if (prompt) send(prompt);
  $("prompt").value = "";
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", stop);
$("steer").addEventListener("click", steer);
$("reconnect").addEventListener("click", reconnect);
$("route").addEventListener("change", reconnect);

loadMenu();
connect();
