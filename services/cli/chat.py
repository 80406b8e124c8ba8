"""`edgedistill chat`: talk with the served model turn by turn, as `ollama run` does."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Optional

import typer

from services.cli.client import connect, rpc_failure
from services.cli.common import TargetOption, TimeoutOption, app, err_console

BLOCK = '"""'  # a message of several lines sits between two of these, as in `ollama run`
HELP = """commands:
  /set system TEXT   the system message (the conversation goes on)
  /clear             forget the conversation (the system message stays)
  /show              the model the server runs
  /bye               end (as Ctrl+D does); Ctrl+C stops an answer
  \"\"\" ... \"\"\"        a message of several lines"""


@dataclass
class Conversation:
    """What the model is shown each turn: the system message, then every answered turn."""

    system: str | None = None
    turns: list[tuple[str, str]] = field(default_factory=list)

    def messages(self, text: str) -> list[tuple[str, str]]:
        """The chat for a new user message."""
        return [*([("system", self.system)] if self.system else []), *self.turns, ("user", text)]

    def answered(self, text: str, answer: str) -> None:
        self.turns += [("user", text), ("assistant", answer)]


def entries(lines: Iterable[str]) -> Iterator[str]:
    """What was typed, one entry per message or command: a line, or the lines between two
    `\"\"\"` (the text on the opening and closing lines included)."""
    block: list[str] | None = None
    for line in lines:
        line = line.rstrip("\n")
        if block is None and line.lstrip().startswith(BLOCK):
            block, line = [], line.lstrip()[len(BLOCK) :]
        if block is None:
            if line.strip():
                yield line.strip()
            continue
        if line.rstrip().endswith(BLOCK):
            block.append(line.rstrip()[: -len(BLOCK)])
            yield "\n".join(block).strip()
            block = None
        else:
            block.append(line)
    if block is not None:  # the input ended inside a block: what was written is the message
        yield "\n".join(block).strip()


def command(entry: str, conversation: Conversation) -> str | None:
    """Apply a `/` command to the conversation; what to tell the user ("bye" to end, "show"
    to describe the model). None when the entry is a message."""
    if not entry.startswith("/"):
        return None
    name, _, rest = entry.partition(" ")
    if name in ("/bye", "/exit"):
        return "bye"
    if name == "/clear":
        conversation.turns.clear()
        return "Cleared the conversation."
    if name == "/set" and rest.startswith("system"):
        conversation.system = rest.removeprefix("system").strip() or None
        return "Set the system message." if conversation.system else "Removed the system message."
    if name == "/show":
        return "show"
    if name in ("/?", "/help"):
        return HELP
    return f"unknown command {name}; /? lists them"


def _typed(interactive: bool) -> Iterator[str]:
    """Lines from the terminal (with a prompt and line editing) or from piped input."""
    if not interactive:
        yield from sys.stdin
        return
    import readline  # noqa: F401  # line editing and history for input()

    while True:
        try:
            yield input(">>> ")
        except EOFError:
            print()
            return


@app.command("chat")
def chat(
    target: TargetOption = "127.0.0.1:50051",
    system: Annotated[Optional[str], typer.Option(help="a system message")] = None,  # noqa: UP045
    max_tokens: Annotated[Optional[int], typer.Option(help="most tokens per answer")] = None,  # noqa: UP045
    temperature: Annotated[Optional[float], typer.Option(help="0 is greedy")] = None,  # noqa: UP045
    top_p: Annotated[Optional[float], typer.Option(help="nucleus sampling mass")] = None,  # noqa: UP045
    seed: Annotated[Optional[int], typer.Option(help="sampling seed")] = None,  # noqa: UP045
    timeout: TimeoutOption = 300.0,
) -> None:
    """Talk with the raw model turn by turn, the conversation kept (as `ollama run`): /? lists
    the commands. Piped input: each line is a message; the first error ends it (exit 1)."""
    interactive = sys.stdin.isatty()
    conversation = Conversation(system=system)
    sampling = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
                "seed": seed}  # fmt: skip
    with connect(target, timeout) as client:
        if interactive:
            err_console.print("[dim]/? for help, /bye or Ctrl+D to end[/]", highlight=False)
        for entry in entries(_typed(interactive)):
            said = command(entry, conversation)
            if said == "bye":
                return
            if said == "show":
                _show(client)
            elif said is not None:
                err_console.print(said, highlight=False, markup=False)
            elif not _turn(client, conversation, entry, sampling) and not interactive:
                raise typer.Exit(1)


def _turn(client: Any, conversation: Conversation, text: str, sampling: dict[str, Any]) -> bool:
    """One answer, streamed; kept in the conversation when it ended. False when the call
    failed (said on stderr)."""
    import grpc

    stream = client.generate(conversation.messages(text), **sampling)
    answer = ""
    try:
        for chunk in stream:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
            answer += chunk.text
    except KeyboardInterrupt:  # stop this answer, not the chat; it is not kept
        stream.cancel()
        print("\n")
        return True
    except grpc.RpcError as err:
        print()
        err_console.print(f"[bold red]error:[/] {err.code().name}: {err.details()}"
                          + ("; /clear starts over" if _too_long(err) else ""),
                          highlight=False, markup=True)  # fmt: skip
        return False
    print("\n")
    conversation.answered(text, answer)
    return True


def _too_long(err: Any) -> bool:
    """The conversation outgrew the model's context (the runtime's refusal says so)."""
    return "over the context of" in (err.details() or "")


def _show(client: Any) -> None:
    import grpc

    try:
        info = client.info()
    except grpc.RpcError as err:
        raise rpc_failure(err) from None
    err_console.print(f"{info.model_name} · {info.quantization} · context {info.context_length} "
                      f"tokens · {info.backend}", highlight=False, markup=False)  # fmt: skip
