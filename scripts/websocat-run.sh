#!/usr/bin/env bash
# Start a JSON-protocol run on /ws/chat with websocat and print its events, one JSON object a line,
# until the run's terminal event. Exits 0 when the run is done, 1 when it ends with an error or is
# cancelled.   scripts/websocat-run.sh "Analyze TSLA" [WORKFLOW] [URL]
set -euo pipefail
prompt=${1:?usage: websocat-run.sh PROMPT [WORKFLOW] [URL]}
workflow=${2:-}
url=${3:-${WSAGENT_URL:-ws://localhost:8000/ws/chat}}
id="sh-$$-$(date +%s%N)"
request=$(python3 -c 'import json, sys
r = {"type": "run", "id": sys.argv[3], "prompt": sys.argv[1]}
if sys.argv[2]:
    r["workflow"] = sys.argv[2]
print(json.dumps(r))' "$prompt" "$workflow" "$id")
dir=$(mktemp -d)
pid=
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$dir"' EXIT
mkfifo "$dir/out"
printf '%s\n' "$request" | websocat -n "$url" > "$dir/out" &
pid=$!
status=1
while IFS= read -r event; do
  printf '%s\n' "$event"
  case $event in
    *'"type":"done","id":"'"$id"'"'*) status=0; break ;;
    *'"type":"error","id":"'"$id"'"'* | *'"type":"cancelled","id":"'"$id"'"'*) break ;;
  esac
done < "$dir/out"
exit "$status"
