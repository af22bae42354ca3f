// A benchmark peer: the relay a Node.js expert would write. The `ws` package's server on /ws/chat (the
// tutorial's text protocol: a prompt in, each content delta out as a text frame, then "\n[DONE]"),
// relaying a fetch (undici) stream parsed line by line; an AbortController tied to the socket's close
// ends the upstream request when the client leaves.
//
//   node scripts/node-peer/relay.mjs 8102    (BENCH_UPSTREAM_URL=http://127.0.0.1:8001/v1)
import { WebSocketServer } from 'ws';

const port = Number(process.argv[2] ?? 8102);
const upstream = `${process.env.BENCH_UPSTREAM_URL ?? 'http://127.0.0.1:8001/v1'}/chat/completions`;
// permessage-deflate stays off, as `ws` ships it: its docs warn that compressing every small message through
// Node's zlib thread pool costs latency and memory (with it on, p99 added latency was 214 ms at 50 x 50).
const server = new WebSocketServer({ port, host: '127.0.0.1', path: '/ws/chat', maxPayload: 1 << 20 });

async function relay(socket, prompt, signal) {
  const response = await fetch(upstream, {
    method: 'POST', signal, headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ model: 'wsagent-sim', stream: true, messages: [{ role: 'user', content: prompt }] }),
  });
  if (!response.ok) {
    socket.send(`[ERROR] upstream HTTP ${response.status}`);
    return;
  }
  const decoder = new TextDecoder();
  let buffered = '';
  for await (const bytes of response.body) {
    buffered += decoder.decode(bytes, { stream: true });
    let end;
    while ((end = buffered.indexOf('\n')) >= 0) {
      const line = buffered.slice(0, end).trim();
      buffered = buffered.slice(end + 1);
      if (!line.startsWith('data: ')) continue;
      const data = line.slice(6);
      if (data === '[DONE]') continue;
      const content = JSON.parse(data).choices?.[0]?.delta?.content;
      if (content) socket.send(content);
    }
  }
  socket.send('\n[DONE]');
}

server.on('connection', socket => {
  const controller = new AbortController();
  let queue = Promise.resolve();
  socket.on('message', data => {
    queue = queue.then(() => relay(socket, data.toString(), controller.signal)).catch(error => {
      if (!controller.signal.aborted) socket.send(`[ERROR] ${error.message}`);
    });
  });
  socket.on('close', () => controller.abort());  // the client left: end the upstream request now
});
