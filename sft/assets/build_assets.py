"""Build the bundled assets: the tiny tokenizer and the embedded demo dataset.

    python -m sft.assets.build_assets

Everything here is deterministic (fixed seeds, sorted JSON keys, no timestamps), so re-running the
script reproduces the committed files byte for byte; a diff after re-running means a real change.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOKENIZER_DIR = HERE / "tiny_tokenizer"
DEMO_DIR = HERE / "demo"

PAD, EOS = "<|pad|>", "<|endoftext|>"
CHATML = ["<|im_start|>", "<|im_end|>"]
LLAMA3 = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# pad first so id 0 is never a real token; pad != eos so padding can never mask the EOS label.
SPECIAL_TOKENS = [PAD, EOS, *CHATML, *LLAMA3]

# Unknown roles raise instead of rendering silently, so bad data is caught at templating time.
_ROLE_CHECK = (
    "{%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{- raise_exception('unknown role: ' + message['role']) }}{%- endif %}"
)
CHATML_TEMPLATE = (
    "{%- for message in messages %}" + _ROLE_CHECK
    + "{{- '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Same text as CHATML_TEMPLATE, but transformers can derive the assistant mask from the markers.
CHATML_GENERATION_TEMPLATE = (
    "{%- for message in messages %}" + _ROLE_CHECK
    + "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- (message['content'] or '') + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Content is not stripped (unlike Meta's template) so whitespace survives a render round-trip.
LLAMA3_TEMPLATE = (
    "{{- '<|begin_of_text|>' }}"
    "{%- for message in messages %}" + _ROLE_CHECK
    + "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + (message['content'] or '') + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# --- demo task -------------------------------------------------------------------------------
# The demo model is ~1M parameters trained for a couple of CPU minutes, so the tasks are ones a
# tiny transformer learns fast (copying through attention, a per-letter map); harder operations
# are rarer so the exact-match score visibly rises instead of averaging out near zero.
OPERATIONS = {
    # name: (system prompt, short user prefix when there is no system prompt, function, weight)
    "copy": ("Repeat the word.", "copy", lambda w: w, 4),
    "upper": ("Capitalize the word.", "caps", str.upper, 4),
    "first": ("Give the first letter.", "first", lambda w: w[0], 2),
    "last": ("Give the last letter.", "last", lambda w: w[-1], 2),
    "reverse": ("Reverse the word.", "reverse", lambda w: w[::-1], 1),
}
N_CONVERSATIONS = 3000
N_EVAL = 64
P_SYSTEM = 0.85
SEED = 1234


def _pick_op(rng: random.Random) -> str:
    names = sorted(OPERATIONS)
    return rng.choices(names, weights=[OPERATIONS[n][3] for n in names])[0]


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))


def _fresh_word(rng: random.Random, taken: set[str]) -> str:
    while True:
        w = _word(rng)
        if w not in taken:
            taken.add(w)
            return w


def _turns(rng: random.Random, op: str, word: str, with_system: bool) -> tuple[str, str]:
    system, prefix, fn, _ = OPERATIONS[op]
    user = word if with_system else f"{prefix}: {word}"
    return user, fn(word)


def build_demo(out_dir: Path = DEMO_DIR) -> tuple[list[dict], list[dict]]:
    rng = random.Random(SEED)
    taken: set[str] = set()
    # Eval words are drawn first and reserved, so no training conversation ever contains one.
    evals = []
    for _ in range(N_EVAL):
        op, word = _pick_op(rng), _fresh_word(rng, taken)
        with_system = rng.random() < P_SYSTEM
        user, answer = _turns(rng, op, word, with_system)
        msgs = ([{"role": "system", "content": OPERATIONS[op][0]}] if with_system else [])
        evals.append({"messages": msgs + [{"role": "user", "content": user}], "answer": answer})
    convs = []
    for _ in range(N_CONVERSATIONS):
        with_system = rng.random() < P_SYSTEM
        op = _pick_op(rng)
        msgs = [{"role": "system", "content": OPERATIONS[op][0]}] if with_system else []
        for _ in range(rng.randint(1, 3)):
            # Without a system prompt each turn names its own operation, so it may change per turn.
            if not with_system:
                op = _pick_op(rng)
            user, answer = _turns(rng, op, _fresh_word(rng, taken), with_system)
            msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        convs.append({"messages": msgs})
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out_dir / "conversations.jsonl", convs)
    _write_jsonl(out_dir / "eval_prompts.jsonl", evals)
    return convs, evals


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n")


# --- tokenizer -------------------------------------------------------------------------------
def build_tokenizer(out_dir: Path = TOKENIZER_DIR):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # Byte-level BPE with no merges: every byte is one token, so each letter and digit is its own
    # token (the demo tasks are per-letter operations) and any text, whitespace included,
    # round-trips exactly. The vocabulary is the 256 byte symbols after the special tokens.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # use_regex=False: no word splitting is needed without merges, and it keeps offsets exact.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,  # no BOS is added by the tokenizer; a template adds one if it wants
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=CHATML + LLAMA3,
        chat_template=CHATML_TEMPLATE,
        clean_up_tokenization_spaces=False,  # the default cleanup would eat spaces before punctuation
        model_max_length=2048,
        padding_side="right",
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out_dir))
    _normalise_json(out_dir / "tokenizer_config.json")
    _normalise_json(out_dir / "special_tokens_map.json")
    (out_dir / "chatml_generation.jinja").write_text(CHATML_GENERATION_TEMPLATE + "\n", encoding="utf-8")
    (out_dir / "llama3_template.jinja").write_text(LLAMA3_TEMPLATE + "\n", encoding="utf-8")
    return hf


def _normalise_json(path: Path) -> None:
    if path.exists():
        data = json.loads(path.read_text(encoding="utf-8"))
        path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def check(out_dir: Path = TOKENIZER_DIR, demo: list[dict] = (), evals: list[dict] = ()) -> None:
    """Load the saved files the way users will, and fail loudly if a promise does not hold."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out_dir))
    assert tok.pad_token_id != tok.eos_token_id and tok.bos_token is None
    for ch in string.ascii_letters + string.digits + string.punctuation:
        assert len(tok.encode(ch, add_special_tokens=False)) == 1, ch
    texts = ["  two  spaces\n\ttab ", "naïve – ünïcode ✓", "a.b , c"]
    for row in list(demo) + list(evals):
        texts += [m["content"] for m in row["messages"]]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=True)
        assert tok.decode(ids) == text, text
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
            {"role": "assistant", "content": "a b"}]
    for name in ("llama3_template.jinja", "chatml_generation.jinja", None):
        template = (out_dir / name).read_text(encoding="utf-8") if name else None
        text = tok.apply_chat_template(msgs, chat_template=template, tokenize=False)
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    gen = (out_dir / "chatml_generation.jinja").read_text(encoding="utf-8")
    out = tok.apply_chat_template(msgs, chat_template=gen, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    trained = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.decode(trained) == "a b<|im_end|>", tok.decode(trained)


def main() -> None:
    demo, evals = build_demo()
    build_tokenizer()
    check(demo=demo, evals=evals)
    tok_files = sorted(p.name for p in TOKENIZER_DIR.iterdir())
    print(f"wrote {len(demo)} conversations, {len(evals)} eval prompts; tokenizer files: {tok_files}")


if __name__ == "__main__":
    main()
