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
# The demo model is ~1M parameters trained from scratch for a few CPU minutes. Per-letter word
# operations (copy, capitalise, reverse) were measured to need ~25 CPU-minutes before exact match
# leaves zero, so the demo teaches instruction-selected lookups instead: the system prompt (or a
# short prefix) picks a table, the user names an entry, the assistant answers with its value. A
# tiny transformer learns these in ~100 steps, so the before/after score shows the tuning working.
TABLES = {
    "color": ("Name the color of the thing.", {
        "sky": "blue", "grass": "green", "snow": "white", "coal": "black", "blood": "red", "sun": "yellow",
        "lemon": "yellow", "leaf": "green", "milk": "white", "night": "black", "rose": "red", "sea": "blue",
        "cherry": "red", "ink": "black", "banana": "yellow", "cloud": "white", "frog": "green", "tomato": "red"}),
    "digit": ("Write the number as a digit.", {
        "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7",
        "eight": "8", "nine": "9"}),
    "plural": ("Give the plural of the word.", {
        "cat": "cats", "dog": "dogs", "tree": "trees", "house": "houses", "bird": "birds", "road": "roads",
        "book": "books", "ship": "ships", "star": "stars", "lamp": "lamps", "door": "doors", "hand": "hands",
        "child": "children", "mouse": "mice", "foot": "feet", "tooth": "teeth"}),
    "opposite": ("Give the opposite of the word.", {
        "hot": "cold", "big": "small", "up": "down", "day": "night", "fast": "slow", "old": "new", "open": "closed",
        "light": "dark", "early": "late", "full": "empty", "high": "low", "left": "right", "win": "lose"}),
    "sound": ("Say the sound the animal makes.", {
        "cow": "moo", "dog": "woof", "cat": "meow", "duck": "quack", "sheep": "baa", "owl": "hoot",
        "lion": "roar", "snake": "hiss", "bee": "buzz", "pig": "oink", "horse": "neigh"}),
}
N_CONVERSATIONS = 3000
P_SYSTEM = 0.85
SEED = 1234


def _turn(rng: random.Random, table: str, with_system: bool) -> tuple[str, str]:
    key = rng.choice(sorted(TABLES[table][1]))
    return (key if with_system else f"{table}: {key}"), TABLES[table][1][key]


def build_demo(out_dir: Path = DEMO_DIR) -> tuple[list[dict], list[dict]]:
    """Training conversations (1-3 lookups each, mostly with a system prompt) and one eval prompt per entry.

    The eval prompts are single-turn conversations written separately from the training ones: the
    facts are shared (that is what is taught), the conversations are not.
    """
    rng = random.Random(SEED)
    names = sorted(TABLES)
    convs = []
    for _ in range(N_CONVERSATIONS):
        with_system = rng.random() < P_SYSTEM
        table = rng.choice(names)
        msgs = [{"role": "system", "content": TABLES[table][0]}] if with_system else []
        for _ in range(rng.randint(1, 3)):
            if not with_system:  # without a system prompt each turn names its own table
                table = rng.choice(names)
            user, answer = _turn(rng, table, with_system)
            msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        convs.append({"messages": msgs})
    evals = [
        {"messages": [{"role": "system", "content": TABLES[t][0]}, {"role": "user", "content": key}], "answer": value}
        for t in names for key, value in sorted(TABLES[t][1].items())
    ]
    rng.shuffle(evals)
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
