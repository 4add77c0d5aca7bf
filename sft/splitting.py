"""`data.overlong=split`: a conversation longer than max_length becomes several examples, none lost.

The cut points are turn boundaries. An *exchange* is the non-assistant messages since the last
assistant turn plus the next assistant turn; each piece is

    system prompt + [context: earlier exchanges, untrained] + [trained: one or more exchanges]

with as many trained exchanges as fit, then as much preceding conversation as still fits as
context. Pieces follow each other, so every assistant turn is trained in exactly one piece.
An exchange that does not fit max_length even alone (with the system prompt) is the only thing
dropped; it is returned as a `Piece` with `dropped=True` so the build counts it and names its
file:line and turn.

Every piece is rendered with the chat template as a conversation of its own and encoded by the
same encoder as everything else, so its tokens are exactly what the template gives for it; the
lengths used to choose the cuts are estimates from the whole conversation's tokens, and each
chosen piece is checked against its real length (and shrunk) before it is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Piece:
    ids: np.ndarray
    target: np.ndarray
    own: list  # system prompt + the trained exchanges: what curation features are computed from
    dropped: bool = False
    turn: int = -1  # index in the conversation of the dropped assistant turn
    length: int = 0  # tokens (also for a dropped turn, which keeps no tokens)


def _runs(target: np.ndarray) -> list[tuple[int, int]]:
    edges = np.flatnonzero(np.diff(np.concatenate([[0], target.astype(np.int8), [0]])))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))


def split_conversation(messages: list[dict], ids: np.ndarray, target: np.ndarray, encode, max_length: int) -> list[Piece]:
    """Pieces of an over-long conversation, in order. `ids`/`target` are its whole encoding;
    `encode(messages) -> (ids, target)` encodes a sub-conversation."""
    s = 1 if messages and messages[0]["role"] == "system" else 0
    system = list(messages[:s])
    ex, start = [], s
    for i in range(s, len(messages)):
        if messages[i]["role"] == "assistant":
            ex.append((start, i + 1))
            start = i + 1
    k = len(ex)
    # Token position where each exchange ends in the whole encoding: just after its assistant run.
    runs = _runs(target)
    if len(runs) == k:
        ends = [hi for _, hi in runs]
        head = _system_length(system, encode)

        def estimate(c: int, e: int) -> int:
            return ends[e - 1] if c == 0 else head + ends[e - 1] - ends[c - 1]
    else:  # the template does not mark one run per assistant turn: every length is measured
        def estimate(c: int, e: int) -> int:
            return len(encode(system + list(messages[ex[c][0] : ex[e - 1][1]]))[0])

    def piece(c: int, t: int, e: int):
        msgs = system + list(messages[ex[c][0] : ex[e - 1][1]])
        p_ids, p_target = encode(msgs)
        if c < t:  # untrain the context exchanges: the first t - c assistant runs
            r = _runs(p_target)
            if len(r) != e - c:
                return None
            p_target = p_target.copy()
            for lo, hi in r[: t - c]:
                p_target[lo:hi] = False
        own = system + list(messages[ex[t][0] : ex[e - 1][1]])
        return Piece(p_ids, p_target, own, length=len(p_ids))

    pieces: list[Piece] = []
    j = 0
    while j < k:
        e = j + 1
        while e < k and estimate(j, e + 1) <= max_length:
            e += 1
        c = j
        while c > 0 and estimate(c - 1, e) <= max_length:
            c -= 1
        while True:
            p = piece(c, j, e)
            if p is not None and p.length <= max_length:
                pieces.append(p)
                j = e
                break
            if c < j:
                c += 1  # less context first: the trained turns matter more
            elif e > j + 1:
                e -= 1
            else:  # this exchange alone is longer than max_length: the only thing dropped
                alone = p if p is not None else piece(j, j, j + 1)
                own = system + list(messages[ex[j][0] : ex[j][1]])
                pieces.append(Piece(alone.ids[:0], alone.target[:0], own, dropped=True, turn=ex[j][1] - 1,
                                    length=alone.length))
                j += 1
                break
    return pieces


def _system_length(system: list, encode) -> int:
    """Tokens the system prompt takes at the head of each piece (an estimate: checked per piece)."""
    if not system:
        return 0
    try:
        return len(encode(system)[0])
    except Exception:  # noqa: BLE001 - a template that needs a user turn: the per-piece check corrects it
        return 0
