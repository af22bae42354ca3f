"""The example app (``examples/ai-sdk-chat/``: React, ``useChat``, ``WebSocketChatTransport``, built by esbuild)
in headless Chromium against wsagent: type, watch it stream, press Stop, reload mid-answer and see it resume."""

from __future__ import annotations

import base64
from pathlib import Path

from wsagent.upstream.simulator import SimulatorServer

from .browser import Browser
from .helpers import AI_SDK_HELPERS, ServerFactory, type_and_send


async def test_type_stream_stop_reload_resume(browser: Browser, make_server: ServerFactory, sim: SimulatorServer,
                                              page_url: str, tmp_path: Path) -> None:
    server = await make_server(allowed_origins=page_url)
    await browser.call("Emulation.setDeviceMetricsOverride", {"width": 900, "height": 1400, "deviceScaleFactor": 1,
                                                             "mobile": False})
    await browser.goto(f"{page_url}/index.html?ws={server.url}/ws/ai-sdk")
    await browser.evaluate(AI_SDK_HELPERS)
    await browser.evaluate("t.until(() => t.status() === 'ready')")

    await type_and_send(browser, "go on forever sim:rate=50 sim:tokens=100000")
    await browser.evaluate("t.until(() => t.answer().length > 30)")
    await browser.evaluate("document.getElementById('stop').click()")
    assert await browser.evaluate("t.until(() => t.status() === 'ready')") is True
    await sim.simulator.stats.wait_for(lambda s: s.disconnected == 1 and s.active == 0, 10)

    prompt = "survive a reload sim:rate=60 sim:tokens=120"
    await type_and_send(browser, prompt)
    partial = await browser.evaluate("t.until(() => t.answer().length > 40 && t.answer())")
    await browser.call("Page.reload")  # mid-answer: the socket goes, the run goes on for --ai-sdk-grace
    await browser.evaluate("new Promise(r => document.readyState === 'complete' ? r() : addEventListener('load', r))")
    await browser.evaluate(AI_SDK_HELPERS)
    answer = await browser.evaluate("t.until(() => t.status() === 'ready' && t.answer().split(' ').length >= 120 "
                                    "&& t.answer())")
    # the simulator answers 120 words (its answer depends on the whole chat, so it is counted, not recomputed):
    # all of them, in order, none twice
    assert len(answer.split()) == 120 and answer.startswith(partial)
    assert sim.simulator.stats.streams == 2  # resumed from wsagent: the model was not asked again
    assert await browser.evaluate("t.answers().length") == 2  # the stopped answer, and the resumed one once

    shot = await browser.call("Page.captureScreenshot", {"format": "png"})
    (tmp_path / "ai-sdk-chat.png").write_bytes(base64.b64decode(shot["data"]))
    box = await browser.evaluate("(() => { const p = t.answers().at(-1).querySelector('.text'); p.scrollIntoView();"
                                 " const r = p.getBoundingClientRect();"
                                 " return {x: r.x, y: r.y, width: r.width, height: r.height, scale: 1}; })()")
    with_text = await browser.call("Page.captureScreenshot", {"format": "png", "clip": box})
    await browser.evaluate("document.querySelectorAll('.text').forEach(p => p.style.visibility = 'hidden')")
    without = await browser.call("Page.captureScreenshot", {"format": "png", "clip": box})
    assert box["width"] > 100 and box["height"] > 10
    assert with_text["data"] != without["data"]  # the answer's pixels are on screen, not only in the DOM


# A person in the loop: the tool call waits with Approve and Deny on screen.

QUESTION = "What is (2 + 3) * 7?"


async def approval_requested(browser: Browser, make_server: ServerFactory, page_url: str, tmp_path: Path,
                             ) -> None:
    """The example pointed at a server whose calculator needs approval, asked ``QUESTION`` by the assistant
    (``?agent=assistant``), until its Approve and Deny buttons show; they must be on screen."""
    server = await make_server(allowed_origins=page_url, approval_tools=("calculator",))
    await browser.call("Emulation.setDeviceMetricsOverride", {"width": 800, "height": 600, "deviceScaleFactor": 1,
                                                             "mobile": False})
    await browser.goto(f"{page_url}/index.html?ws={server.url}/ws/ai-sdk&agent=assistant")
    await browser.evaluate(AI_SDK_HELPERS)
    await browser.evaluate("t.until(() => t.status() === 'ready')")
    await type_and_send(browser, QUESTION)
    assert await browser.evaluate("t.until(() => t.status() === 'ready' && t.button('approve') "
                                  "&& t.button('deny') && true)") is True
    tool = await browser.evaluate("t.tools().map(d => ({state: d.dataset.state, tool: d.dataset.tool, "
                                  "text: d.textContent}))")
    assert [(d["state"], d["tool"]) for d in tool] == [("approval-requested", "calculator")]
    assert '{"expression":"(2 + 3) * 7"}' in tool[0]["text"]
    shot = await browser.call("Page.captureScreenshot", {"format": "png"})
    (tmp_path / "approval-requested.png").write_bytes(base64.b64decode(shot["data"]))
    for name in ("approve", "deny"):
        box = await browser.evaluate(f"""(() => {{
          const b = t.button('{name}'); const r = b.getBoundingClientRect();
          const hit = document.elementFromPoint(r.x + r.width / 2, r.y + r.height / 2);
          return {{x: r.x, y: r.y, width: r.width, height: r.height, text: b.textContent,
                   innerWidth, innerHeight, hit: hit === b}};
        }})()""")
        assert box["text"] == name.capitalize()
        assert box["width"] > 10 and box["height"] > 10  # not empty
        assert box["x"] >= 0 and box["y"] >= 0  # and wholly inside the viewport, on top
        assert box["x"] + box["width"] <= box["innerWidth"] and box["y"] + box["height"] <= box["innerHeight"]
        assert box["hit"] is True


async def test_approve_a_tool_call_in_the_page(browser: Browser, make_server: ServerFactory, page_url: str,
                                              tmp_path: Path) -> None:
    await approval_requested(browser, make_server, page_url, tmp_path)
    await browser.evaluate("t.button('approve').click()")
    output = await browser.evaluate("t.until(() => t.tools()[0]?.dataset.state === 'output-available' "
                                    "&& t.tools()[0].textContent)")
    assert output.endswith('→ "(2 + 3) * 7 = 35"')
    answer = await browser.evaluate("t.until(() => t.status() === 'ready' && t.answer().endsWith('35.') "
                                    "&& t.answer())")
    assert answer == "Based on the tool results: (2 + 3) * 7 = 35."
    assert await browser.evaluate("t.answers().length") == 1  # the same message went on
    assert await browser.evaluate("t.button('approve') === null && t.button('deny') === null") is True


async def test_deny_a_tool_call_in_the_page(browser: Browser, make_server: ServerFactory, page_url: str,
                                           tmp_path: Path) -> None:
    await approval_requested(browser, make_server, page_url, tmp_path)
    await browser.evaluate("t.button('deny').click()")
    answer = await browser.evaluate("t.until(() => t.status() === 'ready' && t.answer().includes('denied') "
                                    "&& t.answer())")
    assert "denied the call to calculator: denied in the example app" in answer  # the model was told
    (tool,) = await browser.evaluate("t.tools().map(d => ({state: d.dataset.state, text: d.textContent}))")
    assert tool["state"] == "output-denied" and "denied" in tool["text"] and "35" not in tool["text"]
    assert await browser.evaluate("t.answers().length") == 1
    assert await browser.evaluate("t.button('approve') === null && t.button('deny') === null") is True
