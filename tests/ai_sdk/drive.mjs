// Drives the AI SDK's own WebSocketChatTransport and readUIMessageStream (npm `ai`, pinned in
// package.json) against a running wsagent, for tests/test_ai_sdk.py.
//
//   node tests/ai_sdk/drive.mjs '<json plan>'
//
// The plan names the server's URL and a list of steps; the script prints one JSON line: what each
// step saw (the assembled UI message, the chunk types in order, an error's text). Node 20 has no
// global WebSocket, so the `ws` package's is passed to the transport, as the issue found works.
// The approval steps use the real `Chat` of '@ai-sdk/react' (useChat's state, no rendering needed).
import { Chat } from '@ai-sdk/react';
import {
  WebSocketChatTransport, isToolUIPart, lastAssistantMessageIsCompleteWithApprovalResponses, readUIMessageStream,
} from 'ai';
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

// A transport that records what it sent (the frames, parsed) and the chunk types of each response.
function recordingTransport(extra = {}) {
  const sent = [];
  const responses = [];
  class RecordingSocket extends WebSocket {
    send(data, ...rest) {
      sent.push(JSON.parse(data));
      return super.send(data, ...rest);
    }
  }
  const record = stream => {
    if (stream == null) return stream;
    const types = [];
    responses.push(types);
    return stream.pipeThrough(new TransformStream({
      transform(chunk, controller) { types.push(chunk.type); controller.enqueue(chunk); },
    }));
  };
  class Recording extends WebSocketChatTransport {
    async sendMessages(options) { return record(await super.sendMessages(options)); }
    async reconnectToStream(options) { return record(await super.reconnectToStream(options)); }
  }
  const t = new Recording({ url: plan.url, webSocket: RecordingSocket, ...plan.transport, ...extra });
  return { transport: t, sent, responses };
}

// What a chat's messages are, for the report: each part's type and state, tool parts' name, input,
// output, approval.
function report(messages) {
  return messages.map(m => ({
    id: m.id,
    role: m.role,
    parts: m.parts.map(p => {
      const part = { type: p.type };
      for (const key of ['state', 'toolName', 'toolCallId', 'input', 'output', 'errorText', 'approval', 'text']) {
        if (p[key] !== undefined) part[key] = p[key];
      }
      return part;
    }),
  }));
}

// Resolves with `check()`'s first truthy value, re-checked on every change of the chat's status or
// messages (event driven); fails after `limit` ms with what the chat held then.
function until(chat, check, what, limit = 20000) {
  return new Promise((resolve, reject) => {
    const offs = [];
    const done = () => { offs.forEach(off => off()); clearTimeout(timer); };
    const test = () => {
      const value = check();
      if (value) { done(); resolve(value); }
    };
    const timer = setTimeout(() => {
      done();
      reject(new Error(`timed out waiting for ${what}: status ${chat.status}, ` +
                       `messages ${JSON.stringify(report(chat.messages))}`));
    }, limit);
    offs.push(chat['~registerStatusCallback'](test), chat['~registerMessagesCallback'](test));
    test();
  });
}

// The chat's tool parts waiting for an answer (in its last message, the assistant's).
function pendingApprovals(chat) {
  const last = chat.lastMessage;
  if (last?.role !== 'assistant') return [];
  return last.parts.filter(p => isToolUIPart(p) && p.state === 'approval-requested');
}

// A Chat as useChat makes it, on a recording transport; its statuses in order.
function chatWith(chatId, messages = [], body = undefined) {
  const recorded = recordingTransport(body ? { body } : {});
  const chat = new Chat({
    id: chatId, messages, transport: recorded.transport,
    sendAutomaticallyWhen: lastAssistantMessageIsCompleteWithApprovalResponses,
  });
  const statuses = [chat.status];
  chat['~registerStatusCallback'](() => statuses.push(chat.status));
  return { chat, statuses, ...recorded };
}

// Answer each pending approval (`decisions` in order) and wait for the automatic send's response to end.
async function answer(chat, statuses, decisions) {
  const pending = pendingApprovals(chat);
  const mark = statuses.length;
  for (const [i, part] of pending.entries()) {
    const { approved, reason } = decisions[Math.min(i, decisions.length - 1)];
    await chat.addToolApprovalResponse({ id: part.approval.id, approved, reason });
  }
  await until(chat, () => statuses.slice(mark).includes('submitted') && (chat.status === 'ready' || chat.status === 'error'),
              'the automatic send after the approval to end');
  return pending.length;
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

// Human in the loop with the real Chat (useChat's class): send `text`; once the response stops at its
// approval request (status ready, a tool part in approval-requested), answer it with `decisions`
// (addToolApprovalResponse); sendAutomaticallyWhen sends the answers and the message continues.
// `reload`: before answering, the page goes (its socket closes) and a new Chat with the same id,
// starting from `keep` of the first one's messages ('all' as a page that stores them, 'user', 'none'),
// resumes the chat on a new transport (resumeStream, what useChat's `resume: true` calls) and answers there.
steps.approval = async function approval(step) {
  const first = chatWith(step.chatId, [], step.body);
  await first.chat.sendMessage({ text: step.text });
  const requested = report(first.chat.messages);
  const firstError = first.chat.error?.message ?? null;
  await until(first.chat, () => first.chat.status === 'ready' && pendingApprovals(first.chat).length > 0,
              'an approval request');
  let answering = first;
  let resumed = null;
  if (step.reload) {
    first.transport.close();  // the page goes away
    const kept = { all: first.chat.messages, user: first.chat.messages.filter(m => m.role === 'user'), none: [] };
    const second = chatWith(step.chatId, structuredClone(kept[step.keep ?? 'all']), step.body);
    await second.chat.resumeStream();
    resumed = { messages: report(second.chat.messages), status: second.chat.status,
                error: second.chat.error?.message ?? null };
    await until(second.chat, () => second.chat.status === 'ready' && pendingApprovals(second.chat).length > 0,
                'the approval request, resumed');
    answering = second;
  }
  const answered = await answer(answering.chat, answering.statuses, step.decisions);
  const result = {
    requested, firstError, resumed, answered,
    messages: report(answering.chat.messages),
    status: answering.chat.status,
    error: answering.chat.error?.message ?? null,
    statuses: answering.statuses,
    responses: answering.responses,
    sent: answering.sent.map(f => ({ type: f.type, trigger: f.trigger, messageId: f.messageId,
                                     roles: f.messages?.map(m => m.role),
                                     last: f.messages?.at(-1)?.parts.filter(isToolUIPart) })),
  };
  await answering.chat.dispose();
  return result;
};

const out = [];
for (const step of plan.steps) {
  out.push(await steps[step.kind](step));
}
process.stdout.write(JSON.stringify(out) + '\n');
