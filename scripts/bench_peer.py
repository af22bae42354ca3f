"""The benchmark's peer: the tutorial's FastAPI /ws/chat relay, written after its pattern.

    uvicorn scripts.bench_peer:app --port 8100    (BENCH_UPSTREAM_URL=http://127.0.0.1:8001/v1)

Like the tutorial: the openai SDK's AsyncOpenAI client, ``async for chunk in stream``, and
``await websocket.send_text(...)`` for each content delta, then ``\\n[DONE]``.
"""

from __future__ import annotations

import os

from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from openai import AsyncOpenAI

app = FastAPI()
client = AsyncOpenAI(base_url=os.environ.get("BENCH_UPSTREAM_URL", "http://127.0.0.1:8001/v1"),
                     api_key=os.environ.get("OPENAI_API_KEY", "bench"), max_retries=0)


@app.websocket("/ws/chat")
async def chat_websocket(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            user_message = await websocket.receive_text()
            stream = await client.chat.completions.create(
                model="wsagent-sim",
                messages=[{"role": "user", "content": user_message}],
                stream=True,
            )
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    await websocket.send_text(chunk.choices[0].delta.content)
            await websocket.send_text("\n[DONE]")
    except WebSocketDisconnect:
        pass
    except Exception as exc:  # the tutorial's handler: report and end
        try:
            await websocket.send_text(f"[ERROR] {exc}")
        except Exception:
            pass
