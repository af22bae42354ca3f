// useChat over wsagent's /ws/ai-sdk with the AI SDK's own WebSocketChatTransport.
// Built with `npm run build:example` (esbuild) into dist/app.js; open index.html from any static server.
// ?ws=ws://host:port/ws/ai-sdk picks the server (default: port 8000 on this page's host),
// ?agent=assistant or ?workflow=market-analysis picks what answers (default: the model).
import { useChat } from '@ai-sdk/react';
import { WebSocketChatTransport } from 'ai';
import { useEffect, useMemo, useState } from 'react';
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

function Part({ part }) {
  if (part.type === 'text') return <p className="text">{part.text}</p>;
  if (part.type === 'reasoning') return <p className="reasoning">{part.text}</p>;
  if (part.type === 'dynamic-tool' || part.type.startsWith('tool-')) {
    const name = part.toolName ?? part.type.slice(5);
    const result = part.state === 'output-available' ? ` → ${JSON.stringify(part.output)}`
      : part.state === 'output-error' ? ` → error: ${part.errorText}` : ' …';
    return <div className="tool">🔧 {name}({JSON.stringify(part.input ?? {})}){result}</div>;
  }
  if (part.type === 'data-agent') return <div className="agent">{part.data.agent}: {part.data.status}</div>;
  return null;
}

function App() {
  const transport = useMemo(() => new WebSocketChatTransport({ url, body }), []);
  const { messages, sendMessage, status, stop, error } = useChat({
    id: chatId(),
    messages: JSON.parse(localStorage.getItem('wsagent-chat-messages') ?? '[]'),
    transport,
    resume: true,
  });
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
            {m.parts.map((part, i) => <Part key={i} part={part} />)}
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
