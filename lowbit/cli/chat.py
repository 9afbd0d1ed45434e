"""``lowbit chat``: a streaming, multi-turn terminal chat."""

from __future__ import annotations

import sys

from lowbit.errors import LowbitError
from lowbit.runtime.sampling import SamplingParams

HELP = "commands: /reset (forget the conversation), /exit (leave); Ctrl-C stops an answer, Ctrl-D leaves"


def chat_loop(llm, params: SamplingParams, system: str | None = None, read=input, write=sys.stdout.write) -> None:
    """Read a line, stream the answer, keep the history; ``read``/``write`` are swappable for tests."""
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    write(f"lowbit chat with {llm.name} ({HELP})\n")
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            write("\n")
            return
        except KeyboardInterrupt:
            write("\n(use /exit or Ctrl-D to leave)\n")
            continue
        if not line:
            continue
        if line == "/exit":
            return
        if line == "/reset":
            history = history[:1] if system else []
            write("(conversation cleared)\n")
            continue
        if line.startswith("/"):
            write(f"unknown command {line}; {HELP}\n")
            continue
        history.append({"role": "user", "content": line})
        answer = []
        write("assistant> ")
        try:
            ids = llm.encode_chat(history)
            for delta, _finish in llm.stream_ids(ids, params):
                answer.append(delta)
                write(delta)
                sys.stdout.flush()
        except KeyboardInterrupt:
            write(" [stopped]")
        except LowbitError as exc:
            history.pop()
            write(f"\nerror: {exc}\n")
            continue
        write("\n")
        history.append({"role": "assistant", "content": "".join(answer)})
