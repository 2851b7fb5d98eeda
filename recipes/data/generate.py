"""Generate the bundled data of the offline demo (deterministic, no network).

    python recipes/data/generate.py            # rewrites the files next to this script
    python recipes/data/generate.py --check    # regenerates in memory, fails if a file differs

The world is synthetic. A *general* corpus tells, in prose, facts about well-known companies and
people (and some cities); *general instruction data* asks about those people and companies in a
chat format. A *finance* corpus tells facts of the same kinds about NEW, niche companies that the
general data never mentions, in prose only. The evaluation sets ask:

- finance questions about the niche companies in the instruction format (greedy exact match), plus a
  multiple-choice variant;
- held-out general instruction questions (pairs of entity and attribute never asked in training);
- held-out finance prose (perplexity).

A model answers a finance question in the instruction format only if it has both the instruction
behaviour (from the instruct model) and the niche facts (from the finance model): that is what the
task-arithmetic merge of the demo is meant to show. See README.md in this directory.

The tokenizer (recipes/data/tokenizer/) is trained on all bundled text by `--tokenizer` (word level,
so every name is one token and a tiny model learns fast).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

SEED = 20240607
HERE = Path(__file__).resolve().parent

# Sizes of the synthetic world.
N_PEOPLE = 40
N_KNOWN = 30          # well-known companies (general corpus)
N_NICHE = 30          # niche companies (finance corpus)
DOCS_PER_ENTITY = 12  # prose documents per entity (varied templates and order)
HELDOUT_DOCS_PER_NICHE = 2
DEV_DOCS_PER_NICHE = 2  # development prose for selection (merge_search), from its own generator
GENERAL_TRAIN_FRACTION = 0.7  # of (entity, attribute) pairs used for instruction tuning
FAQ_PER_DOC = 3  # question-answer pairs per FAQ-style document of the general corpus

CITIES = [
    "Lisbon", "Oslo", "Kyoto", "Lagos", "Denver", "Munich", "Seoul", "Quito", "Perth", "Dublin",
    "Nagoya", "Porto", "Bergen", "Austin", "Lyon", "Cairo", "Hanoi", "Turin", "Leeds", "Malmo",
]
COUNTRIES = ["Portugal", "Norway", "Japan", "Nigeria", "America", "Germany", "Korea", "Ecuador",
             "Australia", "Ireland", "Japan", "Portugal", "Norway", "America", "France", "Egypt",
             "Vietnam", "Italy", "England", "Sweden"]
SECTORS = ["banking", "insurance", "shipping", "mining", "software", "retail", "energy", "steel",
           "textiles", "pharmaceuticals", "telecoms", "brewing", "aviation", "chemicals", "farming"]
PRODUCTS = ["bonds", "turbines", "chips", "ships", "loans", "batteries", "cement", "tyres", "drones",
            "fertilizer", "glass", "paper", "robots", "satellites", "vaccines", "sensors", "cables",
            "pumps", "lenses", "engines"]
PROFESSIONS = ["painter", "chemist", "pilot", "novelist", "architect", "economist", "surgeon",
               "composer", "engineer", "diplomat", "astronomer", "lawyer"]
FIRST = ["Anna", "Boris", "Clara", "Dmitri", "Elena", "Felix", "Greta", "Hugo", "Ines", "Jonas",
         "Karin", "Lars", "Mira", "Nils", "Olga", "Pavel", "Rosa", "Stefan", "Tara", "Viktor"]
LAST = ["Berg", "Costa", "Dahl", "Engel", "Falk", "Gomez", "Holm", "Ito", "Jensen", "Kovac",
        "Lind", "Moreau", "Novak", "Okafor", "Petit", "Quist", "Rossi", "Sato", "Torres", "Vogel"]
KNOWN_SYL = (["Ab", "Cor", "Del", "Gal", "Har", "Mer", "Nor", "Pan", "Ster", "Vol"],
             ["co", "ex", "ia", "on", "ar", "is"])
NICHE_SYL = (["Zen", "Kal", "Quor", "Tiv", "Brel", "Yss", "Omb", "Frax", "Wex", "Jur"],
             ["trivo", "mora", "dex", "lune", "quist", "vane"])

COMPANY_ATTRS = ("city", "sector", "founded", "ceo", "product")
PERSON_ATTRS = ("born", "profession", "birth_year")

# Prose templates: several paraphrases per fact (knowledge is only extractable by a small model
# when it has seen each fact stated in varied ways).
COMPANY_PROSE = {
    "city": ["{e} is headquartered in {v} .", "the headquarters of {e} are in {v} .",
             "{e} has its head office in {v} .", "from its base in {v} , {e} serves many clients ."],
    "sector": ["{e} works in the {v} sector .", "{e} is a company in {v} .",
               "the business of {e} is {v} .", "analysts group {e} with other {v} firms ."],
    "founded": ["{e} was founded in {v} .", "{e} dates back to {v} .",
                "the founders started {e} in {v} .", "since {v} , {e} has grown steadily ."],
    "ceo": ["the chief executive of {e} is {v} .", "{v} leads {e} as chief executive .",
            "{e} is run by {v} .", "under {v} , {e} changed its strategy ."],
    "product": ["{e} is known for its {v} .", "{e} makes {v} .", "the main product of {e} is {v} .",
                "most revenue of {e} comes from {v} ."],
}
PERSON_PROSE = {
    "born": ["{e} was born in {v} .", "{e} grew up in {v} .", "the hometown of {e} is {v} .",
             "{e} spent a childhood in {v} ."],
    "profession": ["{e} is a {v} .", "{e} worked as a {v} .", "by profession {e} is a {v} .",
                   "{e} became a famous {v} ."],
    "birth_year": ["{e} was born in the year {v} .", "{e} came into the world in {v} .",
                   "the birth year of {e} is {v} .", "{e} , born {v} , is well known ."],
}
CITY_PROSE = ["{c} is a city in {k} .", "many people visit {c} in {k} .",
              "{c} lies in {k} .", "the city of {c} belongs to {k} ."]
FINANCE_FILLER = ["the shares of {e} trade on a small exchange .",
                  "few investors follow {e} closely .", "{e} published its annual report .",
                  "the bonds of {e} are rated by one agency ."]

# The instruction format answers with a short phrase that does not repeat the question's subject
# ("where is Kaldex headquartered ?" → "in Leeds ."), then the assistant stops (EOS). The first
# prototype answered with a whole sentence ("Kaldex is headquartered in Leeds ."): the tiny instruct
# model then had to copy the niche company's name, which it could not, and finance questions were
# never answered exactly (see README.md).
ANSWER = {
    "city": "in {v} .", "sector": "the {v} sector .", "founded": "in {v} .", "ceo": "{v} .",
    "product": "its {v} .", "born": "in {v} .", "profession": "a {v} .", "birth_year": "in {v} .",
}

# Instruction-format questions (one answer per question; exact match on the answer).
COMPANY_Q = {
    "city": ["where is {e} headquartered ?", "in which city is the head office of {e} ?"],
    "sector": ["in which sector does {e} work ?", "what business is {e} in ?"],
    "founded": ["when was {e} founded ?", "in which year was {e} started ?"],
    "ceo": ["who is the chief executive of {e} ?", "who runs {e} ?"],
    "product": ["what is {e} known for ?", "what does {e} make ?"],
}
PERSON_Q = {
    "born": ["where was {e} born ?", "which city is the hometown of {e} ?"],
    "profession": ["what is the profession of {e} ?", "what does {e} do for a living ?"],
    "birth_year": ["in which year was {e} born ?", "when was {e} born ?"],
}


@dataclass(frozen=True)
class Entity:
    name: str
    kind: str  # "person" | "company"
    facts: dict[str, str]


def _names(rng: random.Random, syl: tuple[list[str], list[str]], n: int, taken: set[str]) -> list[str]:
    pool = [a + b for a in syl[0] for b in syl[1]]
    rng.shuffle(pool)
    out = [p for p in pool if p not in taken][:n]
    assert len(out) == n
    taken.update(out)
    return out


def build_world(rng: random.Random) -> tuple[list[Entity], list[Entity], list[Entity]]:
    pairs = [(f, la) for f in FIRST for la in LAST]
    rng.shuffle(pairs)
    people = [Entity(f"{f} {la}", "person", {
        "born": rng.choice(CITIES), "profession": rng.choice(PROFESSIONS),
        "birth_year": str(rng.randint(1930, 1990))}) for f, la in pairs[:N_PEOPLE]]
    ceos = iter(f"{f} {la}" for f, la in pairs[N_PEOPLE:])
    taken: set[str] = set()

    def company(name: str) -> Entity:
        return Entity(name, "company", {
            "city": rng.choice(CITIES), "sector": rng.choice(SECTORS),
            "founded": str(rng.randint(1850, 2015)), "ceo": next(ceos),
            "product": rng.choice(PRODUCTS)})

    known = [company(n) for n in _names(rng, KNOWN_SYL, N_KNOWN, taken)]
    niche = [company(n) for n in _names(rng, NICHE_SYL, N_NICHE, taken)]
    return people, known, niche


def prose_doc(rng: random.Random, ent: Entity, finance: bool) -> str:
    tpl = COMPANY_PROSE if ent.kind == "company" else PERSON_PROSE
    sents = [rng.choice(tpl[a]).format(e=ent.name, v=v) for a, v in ent.facts.items()]
    rng.shuffle(sents)
    if finance:
        sents.insert(rng.randint(0, len(sents)), rng.choice(FINANCE_FILLER).format(e=ent.name))
    return " ".join(sents)


def questions(ent: Entity) -> Iterable[tuple[str, str, list[str]]]:
    """(attribute, answer sentence, question paraphrases) per fact of `ent`."""
    tpl = COMPANY_Q if ent.kind == "company" else PERSON_Q
    for attr, v in ent.facts.items():
        yield attr, ANSWER[attr].format(e=ent.name, v=v), [q.format(e=ent.name) for q in tpl[attr]]


VALUES = {"city": CITIES, "sector": SECTORS, "product": PRODUCTS, "born": CITIES,
          "profession": PROFESSIONS}


def choices_for(rng: random.Random, attr: str, answer: str, all_values: dict[str, list[str]]) -> list[str]:
    pool = sorted(set(VALUES.get(attr) or all_values[attr]) - {answer})
    opts = rng.sample(pool, 3) + [answer]
    rng.shuffle(opts)
    return opts


def generate() -> dict[str, list[dict[str, object]]]:
    rng = random.Random(SEED)
    people, known, niche = build_world(rng)
    files: dict[str, list[dict[str, object]]] = {}

    # General corpus: prose about people, well-known companies, cities; shuffled.
    general: list[str] = []
    for ent in people + known:
        general += [prose_doc(rng, ent, finance=False) for _ in range(DOCS_PER_ENTITY)]
    for c, k in zip(CITIES, COUNTRIES, strict=True):
        general += [" ".join(rng.sample(CITY_PROSE, 2)).format(c=c, k=k) for _ in range(4)]

    # General instruction data: split (entity, attribute) pairs into train / held-out.
    train, held, faq = [], [], []
    for ent in people + known:
        for attr, v, qs in questions(ent):
            if rng.random() < GENERAL_TRAIN_FRACTION:
                train += [{"prompt": q, "response": v} for q in qs]
                faq += [f"question : {q} answer : {v}" for q in qs]
            else:
                held.append({"prompt": qs[0], "answer": v, "entity": ent.name, "attribute": attr})
    rng.shuffle(train)
    # Web text is full of questions and answers: the general corpus has FAQ-style pages (plain text,
    # no chat markers) for the trained pairs, so the base knows the kind of question (see README).
    rng.shuffle(faq)
    general += [" ".join(faq[i:i + FAQ_PER_DOC]) for i in range(0, len(faq), FAQ_PER_DOC)]
    rng.shuffle(general)
    files["general/corpus.jsonl"] = [{"text": t} for t in general]
    files["general/instruct.jsonl"] = train
    files["general/eval_instruct.jsonl"] = held

    # Finance corpus: prose only, about the niche companies; a few documents held out for perplexity.
    fin, fin_held = [], []
    for ent in niche:
        docs = [prose_doc(rng, ent, finance=True) for _ in range(DOCS_PER_ENTITY + HELDOUT_DOCS_PER_NICHE)]
        fin += docs[:DOCS_PER_ENTITY]
        fin_held += docs[DOCS_PER_ENTITY:]
    rng.shuffle(fin)
    files["finance/corpus.jsonl"] = [{"text": t} for t in fin]
    files["finance/heldout.jsonl"] = [{"text": t} for t in fin_held]

    # Finance questions in the instruction format, and a multiple-choice variant.
    all_values: dict[str, list[str]] = {a: [e.facts[a] for e in known + niche] for a in COMPANY_ATTRS}
    fq, fmc = [], []
    for ent in niche:
        for attr, v, qs in questions(ent):
            fq.append({"prompt": qs[0], "answer": v, "entity": ent.name, "attribute": attr})
            value = ent.facts[attr]
            opts = choices_for(rng, attr, value, all_values)
            stem = ANSWER[attr].format(e=ent.name, v="\0").split("\0")[0].rstrip()
            fmc.append({"question": qs[0], "context": stem, "choices": opts, "answer": opts.index(value)})
    files["finance/eval_questions.jsonl"] = fq
    files["finance/eval_mc.jsonl"] = fmc

    # Development prose for choosing merges (the demo's merge_search): more documents about the niche
    # companies, drawn from a generator of their own so that every file above stays as it was. No
    # stage trains on them and no evaluation reports them.
    dev_rng = random.Random(SEED + 1)
    files["finance/dev.jsonl"] = [{"text": prose_doc(dev_rng, ent, finance=True)}
                                  for ent in niche for _ in range(DEV_DOCS_PER_NICHE)]
    return files


def dump(rows: list[dict[str, object]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)


CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|> {{ m['content'] }} "
    "{% elif m['role'] == 'assistant' %}<|assistant|> {{ m['content'] }} <|eos|> "
    "{% else %}{{ m['content'] }} {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["<|pad|>", "<|unk|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>"]


def train_tokenizer(texts: list[str], out: Path) -> None:
    """A word-level tokenizer over all bundled text, saved as a PreTrainedTokenizerFast directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIALS, min_frequency=1)
    tok.train_from_iterator(sorted(texts), trainer)
    from tokenizers import decoders
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>",
        unk_token="<|unk|>", model_max_length=256)
    fast.chat_template = CHAT_TEMPLATE
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))


def all_texts(files: dict[str, list[dict[str, object]]]) -> list[str]:
    texts: list[str] = []
    for rows in files.values():
        for r in rows:
            for k in ("text", "prompt", "response", "answer", "question"):
                if isinstance(r.get(k), str):
                    texts.append(str(r[k]))
            for c in r.get("choices", []) or []:  # type: ignore[union-attr]
                texts.append(str(c))
    return texts + [" ".join(CITIES + COUNTRIES + SECTORS + PRODUCTS + PROFESSIONS)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if the committed files differ")
    ap.add_argument("--tokenizer", action="store_true", help="also (re)train recipes/data/tokenizer")
    args = ap.parse_args(argv)
    files = generate()
    bad = []
    for rel, rows in sorted(files.items()):
        text = dump(rows)
        path = HERE / rel
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                bad.append(rel)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        print(f"{rel:32s} {len(rows):6d} rows  {len(text):8d} bytes  sha256 {digest}")
    if args.check:
        if bad:
            print("differs from the generator: " + ", ".join(bad), file=sys.stderr)
            return 1
        return 0
    if args.tokenizer:
        train_tokenizer(all_texts(files), HERE / "tokenizer")
        print("tokenizer written to", HERE / "tokenizer")
    return 0


if __name__ == "__main__":
    sys.exit(main())
