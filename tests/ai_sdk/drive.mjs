// Drives the AI SDK's own WebSocketChatTransport and readUIMessageStream (npm `ai`, pinned in
// package.json) against a running wsagent, for tests/test_ai_sdk.py.
//
//   node tests/ai_sdk/drive.mjs '<json plan>'
//
// The plan names the server's URL and a list of steps; the script prints one JSON line: what each
// step saw (the assembled UI message, the chunk types in order, an error's text). Node 20 has no
// global WebSocket, so the `ws` package's is passed to the transport, as the issue found works.
import { WebSocketChatTransport, readUIMessageStream } from 'ai';
import WebSocket from 'ws';

const plan = JSON.parse(process.argv[2]);

function transport(extra = {}) {
  return new WebSocketChatTransport({ url: plan.url, webSocket: WebSocket, ...plan.transport, ...extra });
}

function userMessage(text, id = 'u1') {
  return { id, role: 'user', parts: [{ type: 'text', text }] };
}

// Reads a UI message stream to its end (or until `stopWhen` says stop), assembling the message.
async function assemble(stream, { stopWhen, onChunk } = {}) {
  const types = [];
  let error = null;
  let stop = false;
  const seen = stream.pipeThrough(new TransformStream({
    transform(chunk, controller) {
      types.push(chunk.type);
      controller.enqueue(chunk);
      if (onChunk) onChunk(chunk, types);
      if (stopWhen && stopWhen(chunk, types)) stop = true;
    },
  }));
  let message = null;
  try {
    for await (const snapshot of readUIMessageStream({ stream: seen, onError: e => { error = String(e?.message ?? e); } })) {
      message = snapshot;
      if (stop) break;
    }
  } catch (e) {
    error = String(e?.message ?? e);
  }
  return { message, types, error };
}

const steps = {
  // One turn: send the chat's messages, read the answer to its end (at `step.url` if it has one).
  async send(step) {
    const t = transport(step.url ? { url: step.url } : {});
    const stream = await t.sendMessages({
      chatId: step.chatId, trigger: 'submit-message', messageId: undefined,
      messages: step.messages ?? [userMessage(step.text)], abortSignal: undefined, body: step.body,
    });
    const result = await assemble(stream);
    t.close();
    return result;
  },
  // Two chats at once on one transport (one socket), each routed by its requestId.
  async two(step) {
    const t = transport();
    const [a, b] = await Promise.all(step.chats.map(async chat => assemble(await t.sendMessages({
      chatId: chat.chatId, trigger: 'submit-message', messageId: undefined,
      messages: [userMessage(chat.text)], abortSignal: undefined, body: chat.body,
    }))));
    t.close();
    return { results: [a, b] };
  },
  // Stop pressed after `after` text deltas: the transport sends abort.
  async abort(step) {
    const t = transport();
    const controller = new AbortController();
    const stream = await t.sendMessages({
      chatId: step.chatId, trigger: 'submit-message', messageId: undefined,
      messages: [userMessage(step.text)], abortSignal: controller.signal, body: step.body,
    });
    const result = await assemble(stream, {
      onChunk: (chunk, types) => {
        if (types.filter(x => x === 'text-delta').length === step.after) controller.abort();
      },
    });
    // the abort frame is queued behind the transport's own send queue; give the socket a round trip
    // to carry it by sending a resume that must answer: the server has taken the abort by then
    const probe = await t.reconnectToStream({ chatId: `probe-${step.chatId}` });
    t.close();
    return { ...result, probe: probe === null ? 'no-active' : 'stream' };
  },
  // The socket drops mid-answer (a page reload); a new transport resumes the chat and reads it all
  // (at `resumeUrl` if the step has one: another node of a cluster).
  async resume(step) {
    const first = transport();
    const stream = await first.sendMessages({
      chatId: step.chatId, trigger: 'submit-message', messageId: undefined,
      messages: [userMessage(step.text)], abortSignal: undefined, body: step.body,
    });
    const before = await assemble(stream, { stopWhen: (_chunk, types) => types.filter(x => x === 'text-delta').length >= step.after });
    first.close();
    const second = transport(step.resumeUrl ? { url: step.resumeUrl } : {});
    const resumed = await second.reconnectToStream({ chatId: step.chatId });
    const after = resumed === null ? null : await assemble(resumed);
    second.close();
    return { before, after };
  },
  // A resume for a chat with no response.
  async noActive(step) {
    const t = transport();
    const resumed = await t.reconnectToStream({ chatId: step.chatId });
    t.close();
    return { resumed: resumed === null ? null : 'stream' };
  },
};

const out = [];
for (const step of plan.steps) {
  out.push(await steps[step.kind](step));
}
process.stdout.write(JSON.stringify(out) + '\n');
