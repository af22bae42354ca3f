"""The page at GET / in headless Chromium against the running server."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import jwt

from wsagent.upstream.simulator import SimulatorServer
from wsagent.wiring.server import WsAgentServer

from .browser import Browser
from .helpers import PAGE_HELPERS, ServerFactory, expected_text, find_run, recv_json, run_events, ws_connect


async def http_get(server: WsAgentServer, path: str) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{server.port}{path}") as response:
        return response.status, dict(response.headers), await response.read()


async def open_page(browser: Browser, server: WsAgentServer) -> None:
    await browser.goto(f"http://127.0.0.1:{server.port}/")
    await browser.evaluate(PAGE_HELPERS)
    await browser.evaluate("t.connected()")


async def test_prompt_streams_token_by_token(browser: Browser, server: WsAgentServer, sim: SimulatorServer) -> None:
    await open_page(browser, server)
    prompt = "Explain streaming sim:rate=100 sim:tokens=30"
    result = await browser.evaluate(f"""(async () => {{
        const run = t.send({json.dumps(prompt)});
        const seen = t.watch(run);
        const outcome = await t.finished(run);
        const turn = t.turn(run);
        return {{ outcome, changes: seen.changes, text: turn.querySelector('.answer').textContent,
                  thoughts: turn.querySelectorAll('details.steps .step').length,
                  meta: turn.querySelector('.meta').textContent }};
    }})()""")
    assert result["outcome"] == "done" and "tokens" in result["meta"]
    assert result["text"] == await expected_text(sim, prompt)
    assert result["changes"] > 10  # the answer grew as tokens arrived, not in one block
    assert result["thoughts"] == 1  # the reasoning, folded into a collapsible step


async def test_stop_cancels(browser: Browser, server: WsAgentServer, sim: SimulatorServer) -> None:
    await open_page(browser, server)
    outcome = await browser.evaluate("""(async () => {
        const run = t.send('go on forever sim:rate=50 sim:tokens=100000');
        await t.until(() => t.turn(run).querySelector('.answer').textContent.length > 20);
        document.getElementById('stop').click();
        return t.finished(run);
    })()""")
    assert outcome == "cancelled"
    await sim.simulator.stats.wait_for(lambda s: s.disconnected == 1, 10)
    assert server.metrics.cancellations["cancelled by client"] == 1


async def test_connection_killed_mid_stream_resumes(browser: Browser, make_server: ServerFactory,
                                                    sim: SimulatorServer) -> None:
    server = await make_server(resume_grace=30)
    await open_page(browser, server)
    prompt = "survive a drop sim:rate=100 sim:tokens=150"
    run = await browser.evaluate(f"t.send({json.dumps(prompt)})")
    await browser.evaluate(f"t.until(() => t.turn('{run}').querySelector('.answer').textContent.length > 40)")
    conn = next(c for c in server.manager if c.path == "/ws/chat")
    conn.ws.transport.abort()  # the network drops: no close frame
    result = await browser.evaluate(f"""(async () => {{
        const outcome = await t.finished('{run}');
        return {{ outcome, text: t.turn('{run}').querySelector('.answer').textContent }};
    }})()""")
    assert result["outcome"] == "done"
    assert result["text"] == await expected_text(sim, prompt)  # nothing lost, nothing repeated
    assert server.manager.total_by_route["/ws/chat"] == 2 and sim.simulator.stats.disconnected == 0


async def test_model_output_is_escaped(browser: Browser, server: WsAgentServer) -> None:
    await open_page(browser, server)
    result = await browser.evaluate("""(async () => {
        const run = t.send('<img src=x onerror="window.pwned=1"><b>bold</b> sim:tokens=40');
        await t.finished(run);
        const answer = t.turn(run).querySelector('.answer');
        return { images: document.querySelectorAll('#log img, #log b').length, text: answer.textContent,
                 pwned: window.pwned === 1 };
    })()""")
    assert result["images"] == 0 and not result["pwned"] and "<img" in result["text"]


async def test_token_field_for_secured_routes(browser: Browser, make_server: ServerFactory) -> None:
    secret = "page-secret-long-enough-for-hs256-use"
    server = await make_server(jwt_secret=secret)
    await open_page(browser, server)
    good = jwt.encode({"user_id": "web", "exp": int(time.time()) + 600}, secret, algorithm="HS256")
    state = await browser.evaluate("""(async () => {
        document.getElementById('token').value = 'not-a-token';
        const route = document.getElementById('route');
        route.value = '/ws/secure';
        route.dispatchEvent(new Event('change'));
        return t.until(() => { const s = document.getElementById('status');
                               return s.dataset.state === 'closed' && s.textContent; });
    })()""")
    assert state == "refused: 4001 Invalid token"
    outcome: Any = await browser.evaluate(f"""(async () => {{
        document.getElementById('token').value = {json.dumps(good)};
        document.getElementById('reconnect').click();
        await t.connected();
        return t.finished(t.send('secured hello sim:tokens=5'));
    }})()""")
    assert outcome == "done"
    assert any(c.user == "web" for c in server.manager) or server.metrics.runs["done"] == 1


async def test_refused_page_shows_why_and_keeps_the_prompt(browser: Browser, make_server: ServerFactory,
                                                           sim: SimulatorServer) -> None:
    """With ``--require-auth`` and no token, the page said only "not connected" once a prompt was sent, and
    dropped the prompt. It shows the server's close code and reason, and sends the prompt once connected."""
    secret = "page-secret-long-enough-for-hs256-use"
    server = await make_server(jwt_secret=secret, require_auth=True)
    await browser.goto(f"http://127.0.0.1:{server.port}/")
    await browser.evaluate(PAGE_HELPERS)
    prompt = "kept for later sim:tokens=5"
    result = await browser.evaluate(f"""(async () => {{
        const status = document.getElementById('status');
        await t.until(() => status.dataset.state === 'closed');
        const run = t.send({json.dumps(prompt)});
        return {{ run, status: status.textContent, state: status.dataset.state,
                  shown: t.turn(run).querySelector('.user').textContent,
                  waiting: t.turn(run).querySelector('.meta').textContent }};
    }})()""")
    assert result["status"].startswith("refused: 4001 Invalid token") and result["state"] == "closed"
    assert result["shown"] == prompt and "waiting" in result["waiting"]
    good = jwt.encode({"user_id": "web", "exp": int(time.time()) + 600}, secret, algorithm="HS256")
    done = await browser.evaluate(f"""(async () => {{
        document.getElementById('token').value = {json.dumps(good)};
        document.getElementById('reconnect').click();
        const outcome = await t.finished({json.dumps(result["run"])});
        return {{ outcome, text: t.turn({json.dumps(result["run"])}).querySelector('.answer').textContent }};
    }})()""")
    assert done == {"outcome": "done", "text": await expected_text(sim, prompt)}
    assert server.manager.total_by_route["/ws/chat"] == 2  # the refused connection, then the one with the token


async def test_page_stops_at_a_refusal_after_the_handshake(browser: Browser, make_server: ServerFactory) -> None:
    """A close that means "no" (here 4029, too many connections for the user) was retried as a drop, for ever:
    each handshake reset the backoff. The page stops and shows the code and the reason."""
    secret = "page-secret-long-enough-for-hs256-use"
    server = await make_server(jwt_secret=secret, max_connections_per_user=1)
    good = jwt.encode({"user_id": "web", "exp": int(time.time()) + 600}, secret, algorithm="HS256")
    async with ws_connect(server, "/ws/secure", additional_headers={"Authorization": f"Bearer {good}"}):
        await open_page(browser, server)
        status = await browser.evaluate(f"""(async () => {{
            document.getElementById('token').value = {json.dumps(good)};
            const route = document.getElementById('route');
            route.value = '/ws/secure';
            route.dispatchEvent(new Event('change'));
            await new Promise(r => setTimeout(r, 2000));  // time enough for a few reconnects, were there any
            return document.getElementById('status').textContent;
        }})()""")
        assert (status, server.manager.total_by_route["/ws/secure"]) == (
            "refused: 4029 Too many connections for this user", 2)  # the test's own, and the page's one attempt


PLAIN_AGENTS = "examples/agents/plain.py:AGENTS"


async def test_agents_are_listed_for_the_menu(make_server: ServerFactory) -> None:
    """GET /agents: what a run's ``agent`` may name, the built-in assistant and those of --agents."""
    server = await make_server(agents=PLAIN_AGENTS)
    status, headers, body = await http_get(server, "/agents")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert json.loads(body) == ["assistant", "blocking", "countdown", "mailer"]
    alone = await make_server()
    assert json.loads((await http_get(alone, "/agents"))[2]) == ["assistant"]


async def test_page_menu_lists_the_loaded_agents(browser: Browser, make_server: ServerFactory) -> None:
    """The page's Run menu had the built-in assistant only: an agent loaded with --agents could not be
    picked. It lists them all, before the workflows, and a run with one is that agent's."""
    server = await make_server(agents=PLAIN_AGENTS)
    await open_page(browser, server)
    result = await browser.evaluate("""(async () => {
        const mode = document.getElementById('mode');
        await t.until(() => mode.querySelector('option[value="agent:countdown"]')
                            && mode.querySelector('option[value^="workflow:"]'));
        const options = [...mode.options].map(o => [o.value, o.textContent]);
        mode.value = 'agent:countdown';
        const run = t.send('go');
        const outcome = await t.finished(run);
        return { options, outcome, text: t.turn(run).querySelector('.answer').textContent };
    })()""")
    agents = [option for option in result["options"] if option[0].startswith("agent:")]
    assert agents == [["agent:assistant", "assistant agent"], ["agent:blocking", "blocking agent"],
                      ["agent:countdown", "countdown agent"], ["agent:mailer", "mailer agent"]]
    values = [value for value, _ in result["options"]]
    assert values[0] == "" and values[1:5] == [value for value, _ in agents]
    assert all(value.startswith("workflow:") for value in values[5:]) and len(values) > 5
    assert result["outcome"] == "done" and result["text"] == "5… 4… 3… 2… 1… liftoff."


async def test_favicon_is_served(server: WsAgentServer) -> None:
    """/favicon.ico was a 404 (logged as a refusal at every page load): the icon, an SVG, is served there
    and at /static/favicon.svg, which the page links."""
    status, headers, icon = await http_get(server, "/static/favicon.svg")
    assert status == 200 and headers["Content-Type"] == "image/svg+xml" and icon.lstrip().startswith(b"<svg")
    assert headers["X-Content-Type-Options"] == "nosniff"
    status, headers, body = await http_get(server, "/favicon.ico")
    assert (status, headers["Content-Type"], body) == (200, "image/svg+xml", icon)
    status, _, page = await http_get(server, "/")
    assert status == 200 and b'<link rel="icon" href="/static/favicon.svg" type="image/svg+xml">' in page


async def test_page_icon_loads_under_its_policy(browser: Browser, server: WsAgentServer) -> None:
    """The linked icon and /favicon.ico load as images in the page, with no Content-Security-Policy
    violation (img-src 'self')."""
    await browser.goto(f"http://127.0.0.1:{server.port}/")
    result = await browser.evaluate("""(async () => {
        const violations = [];
        document.addEventListener('securitypolicyviolation', e => violations.push(e.violatedDirective));
        const load = src => new Promise(resolve => {
            const img = new Image();
            img.onload = () => resolve(img.naturalWidth);
            img.onerror = () => resolve('error');
            img.src = src;
        });
        const link = document.querySelector('link[rel="icon"]');
        return { linked: link && await load(link.href), ico: await load('/favicon.ico'), violations };
    })()""")
    assert result["linked"] not in (None, "error") and result["linked"] > 0
    assert result["ico"] == result["linked"] and result["violations"] == []


CALC = "What is (2 + 3) * 7?"


async def ask_the_assistant(browser: Browser, server: WsAgentServer, prompt: str) -> str:
    """Pick the assistant agent in the Run menu, send ``prompt``; the run's id, once its approval card shows."""
    await open_page(browser, server)
    run: str = await browser.evaluate(f"""(async () => {{
        document.getElementById('mode').value = 'agent:assistant';
        const run = t.send({json.dumps(prompt)});
        await t.until(() => t.turn(run).querySelector('.approval button.approve'));
        return run;
    }})()""")
    return run


async def click_on_screen(browser: Browser, run: str, selector: str, screenshot: Path) -> dict[str, Any]:
    """Click the run's ``selector`` with the mouse, as a person would, where it is on screen; first check that it
    is inside the viewport and not covered, and keep a screenshot of what the person sees."""
    return await click_element(browser, f"t.turn({json.dumps(run)}).querySelector({json.dumps(selector)})",
                               screenshot)


async def click_element(browser: Browser, element: str, screenshot: Path) -> dict[str, Any]:
    """Click the element that the JavaScript expression ``element`` gives, as :func:`click_on_screen` does."""
    where: dict[str, Any] = await browser.evaluate(f"""(() => {{
        const button = {element};
        const r = button.getBoundingClientRect();
        const x = r.left + r.width / 2, y = r.top + r.height / 2;
        return {{ x, y, width: r.width, height: r.height, top: r.top, left: r.left, bottom: r.bottom,
                  right: r.right, innerWidth, innerHeight, text: button.textContent,
                  hit: document.elementFromPoint(x, y) === button }};
    }})()""")
    shot = await browser.call("Page.captureScreenshot", {"format": "png"})
    screenshot.write_bytes(base64.b64decode(shot["data"]))
    assert screenshot.read_bytes().startswith(b"\x89PNG")
    assert where["width"] > 0 and where["height"] > 0
    assert 0 <= where["left"] and where["right"] <= where["innerWidth"], where
    assert 0 <= where["top"] and where["bottom"] <= where["innerHeight"], where
    assert where["hit"], f"the button is covered: {where}"
    for kind in ("mousePressed", "mouseReleased"):
        await browser.call("Input.dispatchMouseEvent", {"type": kind, "x": where["x"], "y": where["y"],
                                                        "button": "left", "clickCount": 1})
    return where


async def test_approve_a_tool_call_from_the_page(browser: Browser, make_server: ServerFactory,
                                                 tmp_path: Path) -> None:
    """An agent's call waits for a person: the page shows a card with the tool and its arguments; Approve
    runs the call, and the card says it was approved."""
    server = await make_server(approval_tools=("calculator",))
    run = await ask_the_assistant(browser, server, CALC)
    card = await browser.evaluate(f"""(() => {{
        const card = t.turn({json.dumps(run)}).querySelector('.approval');
        return {{ title: card.querySelector('.approval-title').textContent,
                  args: card.querySelector('.approval-args').textContent,
                  buttons: [...card.querySelectorAll('button')].map(b => b.textContent),
                  answer: t.turn({json.dumps(run)}).querySelector('.answer').textContent }};
    }})()""")
    assert card["title"] == "⏸ calculator asks for approval"
    assert card["args"] == json.dumps({"expression": "(2 + 3) * 7"}, indent=2)
    assert card["buttons"] == ["Approve", "Deny"] and card["answer"] == ""
    where = await click_on_screen(browser, run, ".approval button.approve", tmp_path / "approval.png")
    assert where["text"] == "Approve"
    result = await browser.evaluate(f"""(async () => {{
        const turn = t.turn({json.dumps(run)});
        const observation = await t.until(() => [...turn.querySelectorAll('.step.observation')]
                                                 .map(s => s.textContent).join('\\n'));
        const outcome = await t.finished({json.dumps(run)});
        const card = turn.querySelector('.approval');
        return {{ observation, outcome, state: card.dataset.state, buttons: card.querySelectorAll('button').length,
                  outcomeText: card.querySelector('.approval-outcome').textContent,
                  cards: turn.querySelectorAll('.approval').length,
                  answer: turn.querySelector('.answer').textContent }};
    }})()""")
    assert result["observation"] == "👁 (2 + 3) * 7 = 35" and result["outcome"] == "done"
    assert (result["state"], result["outcomeText"], result["buttons"], result["cards"]) == ("approved", "approved",
                                                                                           0, 1)
    assert "35" in result["answer"]


async def test_deny_a_tool_call_from_the_page(browser: Browser, make_server: ServerFactory, tmp_path: Path) -> None:
    """Deny, with a reason typed in the card: the tool never runs and the model is told why."""
    server = await make_server(approval_tools=("calculator",))
    run = await ask_the_assistant(browser, server, CALC)
    await browser.evaluate(f"t.turn({json.dumps(run)}).querySelector('.approval-reason').focus()")
    await browser.call("Input.insertText", {"text": "not now"})
    await click_on_screen(browser, run, ".approval button.deny", tmp_path / "deny.png")
    result = await browser.evaluate(f"""(async () => {{
        const outcome = await t.finished({json.dumps(run)});
        const turn = t.turn({json.dumps(run)});
        const card = turn.querySelector('.approval');
        return {{ outcome, observations: turn.querySelectorAll('.step.observation').length,
                  actions: turn.querySelectorAll('.step.action').length, state: card.dataset.state,
                  outcomeText: card.querySelector('.approval-outcome').textContent,
                  buttons: card.querySelectorAll('button').length, answer: turn.querySelector('.answer').textContent }};
    }})()""")
    assert result["outcome"] == "done" and result["observations"] == result["actions"] == 0
    assert (result["state"], result["outcomeText"], result["buttons"]) == ("denied", "denied: not now", 0)
    assert "denied the call to calculator: not now" in result["answer"]


async def test_approval_card_survives_a_reconnect_and_shows_another_clients_answer(
        browser: Browser, make_server: ServerFactory) -> None:
    """The connection drops while a request waits: after the page resumes the run, its card is there once and
    still answerable; a refused answer is said in the run's view (the run goes on); and an answer from another
    client holding the key settles the card (its buttons go)."""
    server = await make_server(approval_tools=("calculator",), resume_grace=30)
    run = await ask_the_assistant(browser, server, CALC)
    await browser.evaluate("window.dropped = state.ws")
    conn = next(c for c in server.manager if c.path == "/ws/chat")
    conn.ws.transport.abort()  # the network drops: no close frame
    result = await browser.evaluate(f"""(async () => {{
        const id = {json.dumps(run)}, turn = t.turn(id);
        await t.until(() => state.ws && state.ws !== window.dropped && state.ws.readyState === WebSocket.OPEN);
        // an answer the server refuses (a call the run never asked about), sent on the page's socket
        state.ws.send(JSON.stringify({{ type: 'approve', id, key: state.runs.get(id).key, call_id: 'call_nope',
                                        approved: true }}));
        const notice = await t.until(() => turn.querySelector('.notice.error')?.textContent);
        return {{ notice, cards: turn.querySelectorAll('.approval').length,
                  enabled: [...turn.querySelectorAll('.approval button')].filter(b => !b.disabled).length,
                  outcome: turn.dataset.outcome ?? null }};
    }})()""")
    assert result["notice"].startswith("refused: unknown_call: ") and result["outcome"] is None
    assert result["cards"] == 1 and result["enabled"] == 2
    assert server.manager.total_by_route["/ws/chat"] == 2
    started = find_run(server, run)
    assert started is not None
    async with ws_connect(server, "/ws/chat") as other:
        await other.send(json.dumps({"type": "attach", "id": run, "key": started.key}))
        request = await recv_json(other)
        while request["type"] != "approval_request":
            request = await recv_json(other)
        await other.send(json.dumps({"type": "approve", "id": run, "key": started.key,
                                     "call_id": request["call_id"], "approved": True}))
        events = await run_events(other, run)
    assert events[-1]["type"] == "done"
    settled = await browser.evaluate(f"""(async () => {{
        const outcome = await t.finished({json.dumps(run)});
        const turn = t.turn({json.dumps(run)});
        const card = turn.querySelector('.approval');
        return {{ outcome, cards: turn.querySelectorAll('.approval').length, state: card.dataset.state,
                  buttons: card.querySelectorAll('button').length,
                  observation: turn.querySelector('.step.observation').textContent }};
    }})()""")
    assert settled == {"outcome": "done", "cards": 1, "state": "approved", "buttons": 0,
                       "observation": "👁 (2 + 3) * 7 = 35"}


async def test_steer_events_are_shown_in_the_run(browser: Browser, make_server: ServerFactory) -> None:
    """A person's steering message (from any client that may) shows in the run's view, delivered or not."""
    server = await make_server(approval_tools=("calculator",))
    run = await ask_the_assistant(browser, server, CALC)
    started = find_run(server, run)
    assert started is not None
    async with ws_connect(server, "/ws/chat") as other:
        await other.send(json.dumps({"type": "steer", "id": run, "key": started.key, "content": "say it in French"}))
        await other.send(json.dumps({"type": "ping"}))
        assert (await recv_json(other))["type"] == "pong"  # the steer before it was taken
        await browser.evaluate(f"t.turn({json.dumps(run)}).querySelector('.approval button.approve').click()")
        shown = await browser.evaluate(f"""(async () => {{
            await t.finished({json.dumps(run)});
            return [...t.turn({json.dumps(run)}).querySelectorAll('.steer')].map(s => s.textContent);
        }})()""")
    assert shown == ["✉ steer: “say it in French” (delivered)"]


STEER_BUTTON = "document.getElementById('steer')"


async def type_in_prompt(browser: Browser, text: str) -> None:
    """Type ``text`` into the prompt box as a person would."""
    await browser.evaluate("document.getElementById('prompt').focus()")
    await browser.call("Input.insertText", {"text": text})
    await browser.evaluate(f"t.until(() => document.getElementById('prompt').value === {json.dumps(text)})")


async def steer_offered(browser: Browser) -> bool:
    """Whether the Steer button is there to press: shown, laid out, enabled."""
    offered: bool = await browser.evaluate(f"(() => {{ const b = {STEER_BUTTON}; "
                                           "return !b.hidden && !b.disabled && b.getClientRects().length > 0; })()")
    return offered


async def test_steer_a_running_agent_from_the_page(browser: Browser, make_server: ServerFactory,
                                                  tmp_path: Path) -> None:
    """While an agent run streams (here: waiting for its approval), a Steer button next to Send sends the
    prompt box's text to it: the box empties, the run's view shows the message sent, and, once the agent
    takes it at its next step (after the approved call), delivered. The run ends with done, the button goes."""
    server = await make_server(approval_tools=("calculator",))
    run = await ask_the_assistant(browser, server, CALC)
    assert await steer_offered(browser)
    await type_in_prompt(browser, "answer in French, please")
    where = await click_element(browser, STEER_BUTTON, tmp_path / "steer.png")
    sent = await browser.evaluate(f"""(async () => {{
        const turn = t.turn({json.dumps(run)});
        const note = turn.querySelector('.steer');
        const shown = {{ text: note.textContent, state: note.dataset.state }};
        // the server took it: its pong came, and no refusal before it
        await t.until(() => note.dataset.state === 'queued');
        return {{ shown, prompt: document.getElementById('prompt').value,
                  turns: document.querySelectorAll('#log .turn').length,
                  notices: turn.querySelectorAll('.notice').length, outcome: turn.dataset.outcome ?? null }};
    }})()""")
    assert where["text"] == "Steer"
    assert sent["shown"]["text"] == "✉ steer sent: “answer in French, please”"
    assert sent["shown"]["state"] in ("sending", "queued")
    assert (sent["prompt"], sent["turns"], sent["notices"], sent["outcome"]) == ("", 1, 0, None)
    started = find_run(server, run)
    assert started is not None and started.steerable
    await click_on_screen(browser, run, ".approval button.approve", tmp_path / "approve.png")
    result = await browser.evaluate(f"""(async () => {{
        const outcome = await t.finished({json.dumps(run)});
        const turn = t.turn({json.dumps(run)});
        return {{ outcome, notes: [...turn.querySelectorAll('.steer')].map(s => [s.textContent, s.dataset.state]),
                  observation: turn.querySelector('.step.observation').textContent,
                  notices: turn.querySelectorAll('.notice').length }};
    }})()""")
    assert result == {"outcome": "done", "notes": [["✉ steer: “answer in French, please” (delivered)", "delivered"]],
                      "observation": "👁 (2 + 3) * 7 = 35", "notices": 0}
    assert not await steer_offered(browser)


async def test_steer_is_offered_only_while_an_agent_run_streams(browser: Browser, make_server: ServerFactory,
                                                                tmp_path: Path) -> None:
    """No Steer button before any prompt, nor while only a model's answer streams; Enter still sends a new
    prompt while an agent runs; a steer the server refuses (its 17th waiting message: too_many_steers) is said
    in the run's view, which goes on; and the button goes once the agent run has ended."""
    # Each steer is a message and a ping: this test sends 17 in one go, over the default burst of 40.
    server = await make_server(approval_tools=("calculator",), message_burst=100)
    await open_page(browser, server)
    assert not await steer_offered(browser)
    model = await browser.evaluate("""(async () => {
        const run = t.send('go on forever sim:rate=50 sim:tokens=100000');
        await t.until(() => t.turn(run).querySelector('.answer').textContent.length > 20);
        return run;
    })()""")
    assert not await steer_offered(browser)  # a model's answer has no step to join
    assert await browser.evaluate(f"document.getElementById('stop').click() || t.finished({json.dumps(model)})") \
        == "cancelled"
    agent: str = await browser.evaluate(f"""(async () => {{
        document.getElementById('mode').value = 'agent:assistant';
        const run = t.send({json.dumps(CALC)});
        await t.until(() => t.turn(run).querySelector('.approval button.approve'));
        return run;
    }})()""")
    assert await steer_offered(browser)
    # Enter sends a new prompt, as ever (a model's answer, which ends); the agent is not steered
    await browser.evaluate("document.getElementById('mode').value = ''")
    await type_in_prompt(browser, "hello sim:tokens=5")
    for kind in ("keyDown", "keyUp"):
        await browser.call("Input.dispatchKeyEvent", {"type": kind, "key": "Enter", "code": "Enter",
                                                      "windowsVirtualKeyCode": 13, "text": "\r"})
    entered = await browser.evaluate("""(async () => {
        const turn = await t.until(() => document.querySelectorAll('#log .turn')[2]);
        return { user: turn.querySelector('.user').textContent, outcome: await t.finished(turn.dataset.run),
                 prompt: document.getElementById('prompt').value };
    })()""")
    assert entered == {"user": "hello sim:tokens=5", "outcome": "done", "prompt": ""}
    assert await steer_offered(browser)  # the agent run still streams: it is the one steered
    # 16 messages wait for the agent's next step; the 17th is refused, in the view, and the run goes on
    await browser.evaluate(f"""(() => {{
        for (let i = 1; i <= 16; i++) {{
            document.getElementById('prompt').value = `note ${{i}}`;
            {STEER_BUTTON}.click();
        }}
    }})()""")
    await type_in_prompt(browser, "one too many")
    await click_element(browser, STEER_BUTTON, tmp_path / "steer.png")
    refused = await browser.evaluate(f"""(async () => {{
        const turn = t.turn({json.dumps(agent)});
        const notice = await t.until(() => turn.querySelector('.notice.error')?.textContent);
        const notes = [...turn.querySelectorAll('.steer')];
        await t.until(() => notes.slice(0, 16).every(n => n.dataset.state === 'queued'));
        return {{ notice, last: notes.at(-1).textContent, state: notes.at(-1).dataset.state, count: notes.length,
                  outcome: turn.dataset.outcome ?? null, approvable: !turn.querySelector('.approve').disabled }};
    }})()""")
    assert refused["notice"].startswith("refused: too_many_steers: ")
    assert (refused["last"], refused["state"]) == ("✉ steer not taken: “one too many” (refused: too_many_steers)",
                                                   "refused")
    assert (refused["count"], refused["outcome"], refused["approvable"]) == (17, None, True)
    assert await steer_offered(browser)
    await click_on_screen(browser, agent, ".approval button.approve", tmp_path / "approve.png")
    result = await browser.evaluate(f"""(async () => {{
        const outcome = await t.finished({json.dumps(agent)});
        const turn = t.turn({json.dumps(agent)});
        return {{ outcome, states: [...turn.querySelectorAll('.steer')].map(s => s.dataset.state),
                  first: turn.querySelector('.steer').textContent, notices: turn.querySelectorAll('.notice').length,
                  others: [...document.querySelectorAll('#log .turn:not([data-run="{agent}"]) .steer')].length }};
    }})()""")
    assert result == {"outcome": "done", "states": ["delivered"] * 16 + ["refused"],
                      "first": "✉ steer: “note 1” (delivered)", "notices": 1, "others": 0}
    assert not await steer_offered(browser)
