"""``python -m wsagent.client``: a terminal client for ``/ws/chat`` (and ``/ws/secure``).

    python -m wsagent.client "What is backpressure?"
    echo "Summarize this" | python -m wsagent.client --json
    python -m wsagent.client --workflow market-analysis "Analyze TSLA"

Tokens render as they arrive; agent thoughts get a mark each (💭 thinking,
🔧 action, 👁 observation, ✅ answer); a workflow gets a live dashboard with
one panel per agent in a terminal, and elsewhere (or with --no-dashboard)
each agent's lines labelled with its name. --attach shows a run started
elsewhere as its owner sees it, each event once. Ctrl-C cancels the run, a
second Ctrl-C quits. Exit codes: 0 done, 1 error, 2 usage, 130 cancelled.

A refusal ends the client at once, with the server's reason on stderr and exit
code 1: an HTTP 4xx answer to the handshake, or a close with 1008, 4001 (bad
or missing token), 4003 (forbidden), 4009, 4029 (rate limit) or another code
that no retry can change (1002, 1003, 1007, 1009, 1010, 4000-4999 but 4008).
Any other drop (1006, 1011, 1012, 1013, a slow-client 4008, HTTP 5xx, a
network error) is retried with jittered exponential backoff (0.5 s doubling
to 8 s, each wait a random half to all of that) and the run resumed from the
last event received (the server needs ``--resume-grace``; in a cluster the
run resumes on whichever node the URL reaches: a node restarting closes its
clients with 1012 and keeps producing their runs, no grace needed). A run
dropped before its start event (no key yet) is asked for by id, and sent
again if the server does not know it. --retries is one
budget for the whole run, not per connection: each failed connect and each
connection that drops before bringing a new event of the run uses one, and
only new events of the run refill it (a run that keeps moving survives any
number of drops; a server that takes the connection and drops it at once is
tried --retries times more, then the client gives up with exit code 1).

Approvals: an agent's tool call that the server holds for a person
(--approval-tools) is shown (⏸ NAME(ARGUMENTS) waits for approval) and, in
a terminal, asked: "approve NAME(ARGUMENTS)? [y/N]"; y sends the approval,
anything else a denial. --approve or --deny answer every request without
asking (for scripts); without a terminal and without either, a request is
denied and stderr says so (never a wait for an answer no one can give). A
watcher (--attach) in a terminal is asked too (the first answer counts),
and without one leaves the answers to the run's owner. The answer (✔/✖) and
steering messages (✉) are shown as they come; --json prints them as events.

Rendering uses rich (``pip install ".[client]"``); without it the
client falls back to plain text. The client's own notes (reconnecting…) go to
stderr when stdout is not a terminal: piped, stdout is the answer alone.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import signal
import sys
import urllib.parse
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from .display import DashboardDisplay, Display, JsonDisplay, TextDisplay, WatchDisplay
from .person import Approver, Policy
from .stream import RunFailed, StreamClient

__all__ = ["main"]

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CANCELLED = 0, 1, 2, 130


def _announcer(url: str, token: str | None) -> Callable[[str, str | None], None]:
    """Say, once the run has started, how to watch it from elsewhere (on stderr: stdout is the answer): the
    whole command, with the URL this client used (a token in its query string left out: no secrets)."""
    parts = urllib.parse.urlsplit(url)
    query = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True) if k != "token"]
    shown = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))
    needs_token = token is not None or len(query) < len(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))

    def announce(run_id: str, key: str | None) -> None:
        command = shlex.join(["python", "-m", "wsagent.client", "--url", shown, "--attach", run_id])
        hint = f"watch from another terminal: {command} --key={shlex.quote(key or '')}"
        sys.stderr.write(hint + ("  # with the same --token (or WSAGENT_TOKEN)\n" if needs_token else "\n"))

    return announce


def _parser() -> argparse.ArgumentParser:
    paragraphs = __doc__.replace("``", "").split("\n\n")  # (the docstring's literals, as plain text)
    parser = argparse.ArgumentParser(prog="python -m wsagent.client", description=paragraphs[0],
                                     epilog="\n\n".join(p for p in paragraphs
                                                          if p.startswith(("A refusal", "Tokens", "Approvals"))),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", nargs="?", help="the prompt (read from stdin when piped)")
    parser.add_argument("--url", default=os.environ.get("WSAGENT_URL", "ws://localhost:8000/ws/chat"),
                        help="server route [WSAGENT_URL] (default: %(default)s)")
    parser.add_argument("--token", default=os.environ.get("WSAGENT_TOKEN"),
                        help="JWT for secured routes, sent as Authorization: Bearer [WSAGENT_TOKEN]")
    parser.add_argument("--workflow", help="run a named workflow (in a terminal, a live panel per agent)")
    parser.add_argument("--agent", help="run a named agent (assistant)")
    parser.add_argument("--model", help="model name to ask the upstream for")
    parser.add_argument("--max-tokens", type=int, help="answer length limit (also sizes the progress bars)")
    parser.add_argument("--json", action="store_true", help="print raw events, one JSON object per line")
    parser.add_argument("--no-dashboard", action="store_true", help="workflows as plain text, not panels")
    parser.add_argument("--retries", type=int, default=5,
                        help="reconnects allowed without the run moving: one budget for the whole run, whole again "
                             "whenever a new event of the run arrives; a refusal is never retried (see below) "
                             "(default: %(default)s)")
    parser.add_argument("--attach", metavar="ID", help="watch run ID that another client started (needs --key), "
                                                       "as its owner sees it (a workflow's dashboard too)")
    parser.add_argument("--key", help="the key of the run to --attach to, as --key=KEY (a key may begin with -; "
                                      "its start event has it)")
    answers = parser.add_mutually_exclusive_group()
    answers.add_argument("--approve", action="store_true",
                         help="approve every tool call the run asks a person about, without asking")
    answers.add_argument("--deny", action="store_true",
                         help="deny every tool call the run asks a person about, without asking")
    return parser


def _policy(args: argparse.Namespace) -> Policy:
    """How approval requests are answered: by a flag, by the person at the terminal, or (no one to ask)
    denied; a watcher with no one to ask leaves them to the run's owner."""
    if args.approve:
        return Policy.APPROVE
    if args.deny:
        return Policy.DENY
    if sys.stdin.isatty():
        return Policy.ASK
    return Policy.WATCH if args.attach else Policy.UNASKED


async def _main(args: argparse.Namespace, prompt: str) -> int:
    def text() -> Display:
        tty = sys.stdout.isatty()
        return TextDisplay(sys.stdout, color=tty, notes=None if tty else sys.stderr)

    def dashboard() -> Display:
        try:
            return DashboardDisplay(sys.stdout, args.max_tokens)
        except ImportError:
            return TextDisplay(sys.stdout, color=False)

    display: Display
    if args.json:
        display = JsonDisplay(sys.stdout)
    elif args.no_dashboard or not sys.stdout.isatty():
        display = text()
    elif args.workflow:
        display = dashboard()
    elif args.attach:  # the run says what it is: a workflow's events carry its name
        display = WatchDisplay(lambda event: dashboard() if event.get("workflow") else text())
    else:
        display = text()
    request: dict[str, Any]
    if args.attach:
        request = {"type": "attach", "id": args.attach, "key": args.key}
    else:
        request = {"type": "run", "id": f"cli-{uuid.uuid4().hex[:12]}", "prompt": prompt}
        for key in ("workflow", "agent", "model"):
            if getattr(args, key):
                request[key] = getattr(args, key)
        if args.max_tokens:
            request["params"] = {"max_tokens": args.max_tokens}
    client = StreamClient(args.url, args.token, display, retries=args.retries)
    if sys.stderr.isatty():
        client.on_start = _announcer(args.url, args.token)
    approver = Approver(client.answer, display, _policy(args))
    client.on_event = approver.event
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None

    def interrupt() -> None:
        if client.cancel_requested or args.attach:  # a watcher leaves; the run is someone else's
            main_task.cancel()
        else:
            display.note("cancelling… (Ctrl-C again to quit)")
            client.cancel()

    loop.add_signal_handler(signal.SIGINT, interrupt)
    try:
        terminal = await client.run(request)
    except RunFailed as exc:
        display.close()
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_ERROR
    except asyncio.CancelledError:
        display.close()
        return EXIT_CANCELLED
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        await approver.close()
    display.close()
    if terminal["type"] == "done":
        return EXIT_OK
    if terminal["type"] == "cancelled":
        return EXIT_CANCELLED
    return EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.attach and not args.key:
        _parser().print_usage(sys.stderr)
        sys.stderr.write("error: --attach needs --key (the run's key: its start event has it)\n")
        return EXIT_USAGE
    prompt = args.prompt
    if prompt is None and not args.attach and not sys.stdin.isatty():
        prompt = sys.stdin.read().strip()
    if not prompt and not args.attach:
        _parser().print_usage(sys.stderr)
        sys.stderr.write("error: give a prompt as an argument or on stdin\n")
        return EXIT_USAGE
    return asyncio.run(_main(args, prompt or ""))
