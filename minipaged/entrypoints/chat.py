"""`minipaged chat`: a terminal conversation with the model, streamed token by token.

Nothing here is from the paper itself, but it shows the engine's step loop at its
plainest: each user turn is the whole conversation so far, templated, added as one
request; the loop steps the engine until that request finishes and prints the text each
step adds.

Invariant: every turn's request ends finished or aborted (Ctrl-C aborts it), so its
blocks are back in the free pool before the next turn starts.
"""

from __future__ import annotations

import json
import sys

from minipaged.entrypoints.request_stream import DeltaTracker

CHAT_HELP = "/reset forgets the conversation, /stats shows the KV cache, /exit quits"


def run_chat(llm, params, system: str | None = None, stdin=None, stdout=None) -> int:
    """A read-eval-print loop: each line is a user turn, the answer streams as it decodes.

    The engine is stepped here directly (no server): add the templated conversation,
    step until it finishes, print each step's new text. Ctrl-C stops the answer (the
    request is aborted and its blocks freed); EOF or /exit ends the session.
    """
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    if params.n != 1 or params.use_beam_search:
        raise ValueError("params: chat gives one answer per turn (n=1, no beam search)")
    if not has_chat_template(llm):
        raise ValueError("llm: this model has no chat template")
    tokenizer = llm.get_tokenizer()
    engine = llm.llm_engine
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    interactive = stdin.isatty()
    if interactive:
        print(f"minipaged chat ({CHAT_HELP})", file=sys.stderr)
    for turn in range(10**9):
        if interactive:
            print("you> ", end="", file=sys.stderr, flush=True)
        try:
            line = stdin.readline()
        except KeyboardInterrupt:
            break
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history = history[:1] if system else []
            continue
        if line == "/stats":
            print(json.dumps(engine.stats(), indent=1), file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        text = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        ids = tokenizer.encode(text, add_special_tokens=False)
        request_id = f"chat-{turn}"
        try:
            engine.add_request(request_id, text, params, prompt_token_ids=ids)
        except ValueError as e:           # the conversation outgrew the context
            history.pop()
            print(f"minipaged chat: {e} (try /reset)", file=sys.stderr)
            continue
        deltas, answer = DeltaTracker(params), ""
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    new, _, _ = deltas.advance(0, out.outputs[0])
                    if new:
                        stdout.write(new)
                        stdout.flush()
                        answer = out.outputs[0].text
                    if out.finished:
                        answer = out.outputs[0].text
        except KeyboardInterrupt:
            engine.abort_request(request_id)
        stdout.write("\n")
        stdout.flush()
        history.append({"role": "assistant", "content": answer})
    return 0


def has_chat_template(llm) -> bool:
    """Whether the model's tokenizer can template a conversation."""
    tokenizer = llm.get_tokenizer()
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))
