#!/usr/bin/env bash
# Ask wsagent's /ws/chat one question with websocat and print the streamed answer as it arrives.
#   scripts/websocat-chat.sh "What is backpressure?" [ws://localhost:8000/ws/chat]
set -euo pipefail
prompt=${1:?usage: websocat-chat.sh PROMPT [URL]}
url=${2:-${WSAGENT_URL:-ws://localhost:8000/ws/chat}}
dir=$(mktemp -d)
pid=
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$dir"' EXIT
mkfifo "$dir/out"
# -0: messages are separated by NUL, not newline, so tokens print as they come and the
# end marker ("\n[DONE]", which has no newline after it) is still seen as a whole message.
# -n: the end of stdin does not close the socket before the answer has streamed.
printf '%s\0' "$prompt" | websocat -n -0 -t "$url" > "$dir/out" &
pid=$!
while IFS= read -r -d '' message; do
  printf '%s' "$message"
  case $message in *"[DONE]" | "[ERROR]"* | *"[CANCELLED]"*) break ;; esac
done < "$dir/out"
echo
