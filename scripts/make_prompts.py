"""Write the project's everyday-request prompt sets: data/prompts_train.jsonl and data/prompts_eval.jsonl.

Each prompt is one request form applied to one topic. The evaluation set uses topics that never appear in the
training set, so a draft trained on the training prompts is measured on subjects it has not seen. No form asks for
negative text.

    python scripts/make_prompts.py            # rewrites both files (deterministic)
"""
from __future__ import annotations

import json
import os
import random

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TOPICS = [
    "a rainy day", "learning to cook", "the ocean", "a job interview", "your favourite book", "space travel",
    "a city at night", "gardening", "friendship", "a mountain hike", "coffee", "a school trip", "music", "winter",
    "a lost cat", "the internet", "a small village", "running a marathon", "painting", "trains", "homework",
    "a birthday party", "a new phone", "learning a language", "a broken bike", "the history of bread",
    "moving to a new city", "healthy breakfasts", "chess", "a summer holiday", "electric cars", "a first day at work",
    "dogs", "saving money", "the moon", "a football match", "volunteering", "old photographs", "baking bread",
    "a road trip", "recycling", "public libraries", "a wedding", "houseplants", "board games", "the rainforest",
    "solar panels", "a visit to the dentist", "yoga", "a thunderstorm", "camping", "a farmers' market", "bicycles",
    "a science fair", "writing a diary", "the first snow", "a picnic in the park", "a museum visit", "tea",
    "learning to swim", "a long flight", "a neighbourhood bakery", "spring cleaning", "bees", "knitting",
    "a family dinner", "a job promotion", "a power cut", "street food", "a train station", "autumn leaves",
    "a new puppy", "photography", "the night sky", "a concert", "a childhood friend", "a video call", "pizza",
    "a quiet morning", "a bookshop", "rivers", "a school reunion", "learning the guitar", "the seaside",
]
EVAL_TOPICS = [
    "a hot air balloon", "a lighthouse", "penguins", "a mountain cabin", "a chocolate cake", "a marching band",
    "a snowy forest", "a robot helper", "an old clock", "a kite festival", "a coral reef", "a sailing trip",
    "a vegetable soup", "a paper airplane", "a rooftop garden", "a jazz club", "a desert sunrise", "owls",
    "a bus journey", "a sandcastle", "a village fair", "an umbrella", "a pottery class", "a treehouse",
    "a waterfall",
]
FORMS = [
    "Write a short story about {}.", "Give three tips about {}.", "Describe {} in a few sentences.",
    "Write a short poem about {}.", "Explain to a child what is special about {}.",
    "Write a friendly email to a colleague about {}.", "What are the pros and cons of {}?",
    "Write a product review that mentions {}.", "Summarise in two sentences why people care about {}.",
    "Answer briefly: what should I know about {}?", "Write a tweet about {}.",
    "List five words that come to mind for {}.", "Write a dialogue between two friends about {}.",
    "How would you explain {} to your grandmother?", "Write a diary entry about {}.",
    "Give me a fun fact about {}.", "Write a short speech about {}.", "Plan a weekend around {}.",
    "Write the opening paragraph of a novel about {}.", "What questions would a journalist ask about {}?",
]


def build(seed: int = 0):
    train = [{"prompt": f.format(t), "topic": t} for t in TOPICS for f in FORMS]
    rng = random.Random(seed)
    rng.shuffle(train)
    evals = [{"prompt": f.format(t), "topic": t} for t in EVAL_TOPICS for f in FORMS]
    rng.shuffle(evals)
    return train, evals


def write(path, rows):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def main():
    train, evals = build()
    os.makedirs(os.path.join(ROOT, "data"), exist_ok=True)
    write(os.path.join(ROOT, "data", "prompts_train.jsonl"), train)
    write(os.path.join(ROOT, "data", "prompts_eval.jsonl"), evals)
    print(f"{len(train)} training prompts ({len(TOPICS)} topics), {len(evals)} evaluation prompts "
          f"({len(EVAL_TOPICS)} other topics), {len(FORMS)} request forms")


if __name__ == "__main__":
    main()
