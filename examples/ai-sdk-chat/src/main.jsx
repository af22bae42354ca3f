// useChat over wsagent's /ws/ai-sdk with the AI SDK's own WebSocketChatTransport.
// Built with `npm run build:example` (esbuild) into dist/app.js; open index.html from any static server.
// ?ws=ws://host:port/ws/ai-sdk picks the server (default: port 8000 on this page's host),
// ?agent=assistant or ?workflow=market-analysis picks what answers (default: the model).
// A tool call that needs a person's approval (wsagent's --approval-tools) shows Approve and Deny:
// addToolApprovalResponse records the answer and sendAutomaticallyWhen sends it, and the answer goes on
// in the same message.
import { useChat } from '@ai-sdk/react';
import { WebSocketChatTransport, lastAssistantMessageIsCompleteWithApprovalResponses } from 'ai';
import { useEffect, useMemo, useRef, useState } from 'react';
import { createRoot } from 'react-dom/client';

const query = new URLSearchParams(location.search);
const url = query.get('ws') ?? `ws://${location.hostname || 'localhost'}:8000/ws/ai-sdk`;
const body = Object.fromEntries(['agent', 'workflow', 'model'].filter(k => query.has(k)).map(k => [k, query.get(k)]));

// The chat survives a reload: its id and messages are kept in this browser, and useChat's
// `resume` asks the server for the answer that was streaming when the page went away.
function chatId() {
  let id = localStorage.getItem('wsagent-chat-id');
  if (id == null) {
    id = crypto.randomUUID();
    localStorage.setItem('wsagent-chat-id', id);
  }
  return id;
}

// Close codes that mean "no": connecting again cannot change the answer (a slow client's 4008 can).
const REFUSED = new Set([1002, 1003, 1007, 1008, 1009, 1010, 4001, 4003, 4009, 4029]);

// Whether a response failed because its socket went: wsagent restarting a node (close 1012, "service
// restart: reconnect and resume"), a server going away, the network dropping. The transport fails the
// response with a TypeError ("WebSocket chat network connection closed (code 1012: …)." or "… failed.")
// and leaves resuming to the page; a close that means "no" (a bad token, a limit) is not a drop.
function dropped(error) {
  if (!(error instanceof TypeError) || !/network connection/.test(error.message)) return false;
  const code = Number(/\(code (\d+)/.exec(error.message)?.[1]);
  return !(REFUSED.has(code) || (code >= 4000 && code < 5000 && code !== 4008));
}

// A dropped answer is resumed by the chat's id on a new socket (which, behind a load balancer, reaches a
// node still up: wsagent's cluster keeps producing the answer meanwhile), with jittered exponential backoff
// (0.25 s doubling to 8 s, each wait a random half to all of that; whole again once the answer streams).
// The server replays the answer from its first chunk, and useChat puts it in place of the part shown.
function useResumeOnDrop({ status, error, resumeStream }) {
  const attempt = useRef(0);
  useEffect(() => {
    if (status === 'streaming') attempt.current = 0;
    if (status !== 'error' || !dropped(error)) return undefined;
    const delay = Math.min(8000, 250 * 2 ** attempt.current) * (0.5 + Math.random() / 2);
    attempt.current += 1;
    const timer = setTimeout(() => resumeStream(), delay);
    return () => clearTimeout(timer);
  }, [status, error, resumeStream]);
}

function ToolPart({ part, answer }) {
  const name = part.toolName ?? part.type.slice(5);
  const call = `🔧 ${name}(${JSON.stringify(part.input ?? {})})`;
  if (part.state === 'approval-requested') {
    const id = part.approval.id;
    return (
      <div className="tool approval" data-state={part.state} data-tool={name}>
        <span>{call} needs your approval</span>
        <button className="approve" type="button" onClick={() => answer({ id, approved: true })}>Approve</button>
        <button className="deny" type="button"
                onClick={() => answer({ id, approved: false, reason: 'denied in the example app' })}>Deny</button>
      </div>
    );
  }
  const result = part.state === 'output-available' ? ` → ${JSON.stringify(part.output)}`
    : part.state === 'output-error' ? ` → error: ${part.errorText}`
    : part.state === 'output-denied' ? ` → denied${part.approval?.reason ? ` (${part.approval.reason})` : ''}`
    : part.state === 'approval-responded' ? (part.approval.approved ? ' → approved …' : ' → denied …') : ' …';
  return <div className="tool" data-state={part.state} data-tool={name}>{call}{result}</div>;
}

function Part({ part, answer }) {
  if (part.type === 'text') return <p className="text">{part.text}</p>;
  if (part.type === 'reasoning') return <p className="reasoning">{part.text}</p>;
  if (part.type === 'dynamic-tool' || part.type.startsWith('tool-')) return <ToolPart part={part} answer={answer} />;
  if (part.type === 'data-agent') return <div className="agent">{part.data.agent}: {part.data.status}</div>;
  return null;
}

function App() {
  const transport = useMemo(() => new WebSocketChatTransport({ url, body }), []);
  const { messages, sendMessage, status, stop, error, resumeStream, addToolApprovalResponse } = useChat({
    id: chatId(),
    messages: JSON.parse(localStorage.getItem('wsagent-chat-messages') ?? '[]'),
    transport,
    resume: true,
    // the answers to a message's approval requests go to the server once all are given
    sendAutomaticallyWhen: lastAssistantMessageIsCompleteWithApprovalResponses,
  });
  useResumeOnDrop({ status, error, resumeStream });
  useEffect(() => {
    localStorage.setItem('wsagent-chat-messages', JSON.stringify(messages));
    document.getElementById('status').scrollIntoView({ block: 'end' });  // follow the answer as it grows
  }, [messages]);
  const [input, setInput] = useState('');
  const busy = status === 'submitted' || status === 'streaming';
  return (
    <main>
      <h1>wsagent × AI SDK useChat</h1>
      <ol id="messages">
        {messages.map(m => (
          <li key={m.id} className={m.role} data-id={m.id}>
            <div className="role">{m.role}</div>
            {m.parts.map((part, i) => <Part key={i} part={part} answer={addToolApprovalResponse} />)}
          </li>
        ))}
      </ol>
      <form onSubmit={e => { e.preventDefault(); if (input.trim() && !busy) { sendMessage({ text: input }); setInput(''); } }}>
        <input id="prompt" value={input} placeholder="Ask something" onChange={e => setInput(e.target.value)} />
        {busy
          ? <button id="stop" type="button" onClick={() => stop()}>Stop</button>
          : <button id="send" type="submit">Send</button>}
      </form>
      <p id="status" data-status={status}>{status}{error ? `: ${error.message}` : ''}</p>
    </main>
  );
}

createRoot(document.getElementById('root')).render(<App />);
