#!/usr/bin/env bash
# Start a JSON-protocol run on /ws/chat with websocat and print its events, one JSON object a line,
# until the run's terminal event.   scripts/websocat-run.sh "Analyze TSLA" [WORKFLOW] [URL]
set -euo pipefail
prompt=${1:?usage: websocat-run.sh PROMPT [WORKFLOW] [URL]}
workflow=${2:-}
url=${3:-${WSAGENT_URL:-ws://localhost:8000/ws/chat}}
request=$(python3 -c 'import json, sys
r = {"type": "run", "id": "cli", "prompt": sys.argv[1]}
if sys.argv[2]:
    r["workflow"] = sys.argv[2]
print(json.dumps(r))' "$prompt" "$workflow")
dir=$(mktemp -d)
pid=
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$dir"' EXIT
mkfifo "$dir/out"
printf '%s\n' "$request" | websocat -n "$url" > "$dir/out" &
pid=$!
while IFS= read -r event; do
  printf '%s\n' "$event"
  case $event in *'"type":"done","id":"cli"'* | *'"type":"error","id":"cli"'* | *'"type":"cancelled","id":"cli"'*) break ;; esac
done < "$dir/out"
