"""Write the project's everyday-request prompt sets: data/prompts_train.jsonl, data/prompts_eval.jsonl and
data/prompts_train_extra.jsonl.

Each prompt is one request form applied to one topic. The evaluation set uses topics that never appear in either
training set, so a draft trained on the training prompts is measured on subjects it has not seen. No form asks for
negative text. The extra training set (more topics, more request forms) widens the feature-draft heads' data; it is
a separate file so that the first two stay as they were (the weak-to-strong pipeline reads them).

    python scripts/make_prompts.py            # rewrites all three files (deterministic)
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

# topics for the heads' wider training data: none is one of EVAL_TOPICS (a few share a word with one)
EXTRA_TOPICS = [
    "a vegetable garden in spring", "learning to drive", "a grandmother's recipe", "the post office", "a rainy bus stop",
    "a science museum", "building a bookshelf", "a cup of hot cocoa", "a marathon volunteer", "a new haircut",
    "the first day of school", "an art gallery", "a family reunion", "planting a tree", "a farm visit", "a nature walk",
    "a bakery opening", "learning to code", "a city park", "a flower shop", "a library card", "a surprise party",
    "a hiking trail", "strawberries", "a fishing trip", "a swimming pool", "a cooking class", "a book club",
    "a sunny afternoon", "a crossword puzzle", "a home office", "a spelling bee", "a charity run", "the zoo",
    "a morning jog", "a new neighbour", "homemade pasta", "a talent show", "a school play", "a quiet library",
    "a winter coat", "a lemonade stand", "a dance class", "a camping stove", "a cosy blanket", "the stars",
    "a tennis match", "a music lesson", "a science project", "a picnic basket", "a toy shop", "an apple orchard",
    "a county show", "a puzzle box", "a pen pal", "a summer camp", "a bicycle repair shop", "a gardening club",
    "fresh bread rolls", "a letter from a friend", "a holiday card", "a pumpkin patch", "a snowman", "a birdhouse",
    "a rainbow", "a long weekend", "a movie night", "a board game cafe", "a yoga retreat", "a sports day",
    "a sewing circle", "a history lesson", "an open-air cinema", "a walk by the canal", "a family recipe book",
    "a potluck dinner", "an ice rink", "the first spring flowers", "a cycling holiday", "a new bicycle helmet",
    "an evening class", "a theatre trip", "a science podcast", "a tidy desk", "a herb garden", "a breakfast cafe",
    "a school garden", "a train ride through the hills", "a field of sunflowers", "a clean kitchen", "a new notebook",
    "a dog walker", "a community garden", "a hat shop", "a market town", "a lake in summer", "a bowl of ramen",
    "a rescue dog", "a street musician", "a science teacher", "a football coach", "a cheese shop", "a tea party",
    "a carpenter's workshop", "a poetry reading", "a hammock", "a garden bench", "an ice cream van", "a city marathon",
    "a photo album", "a nurse's day", "a firefighter", "a postcard from abroad", "a bird feeder", "a cherry blossom",
    "a student flat", "a cycling club", "a harvest festival", "a home-made pizza night", "a local newspaper",
    "a choir rehearsal", "a weekend market", "a hot bath", "a sunny balcony", "a new recipe", "a language exchange",
    "a morning routine", "a library book sale", "the first warm day of the year",
]
EXTRA_FORMS = FORMS + [
    "Write a short thank-you note about {}.", "Give me a simple plan for {}.", "Tell me a cheerful story about {}.",
    "Describe a perfect day involving {}.", "Write a limerick about {}.", "What can a beginner learn from {}?",
    "Write a short blog post about {}.", "Give two reasons to enjoy {}.", "Write a postcard message about {}.",
    "Describe {} to someone who has never seen it.",
]


def build_extra(seed: int = 1):
    rows = [{"prompt": f.format(t), "topic": t} for t in EXTRA_TOPICS for f in EXTRA_FORMS]
    random.Random(seed).shuffle(rows)
    return rows


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
    extra = build_extra()
    write(os.path.join(ROOT, "data", "prompts_train_extra.jsonl"), extra)
    print(f"{len(train)} training prompts ({len(TOPICS)} topics), {len(evals)} evaluation prompts "
          f"({len(EVAL_TOPICS)} other topics), {len(FORMS)} request forms; {len(extra)} extra training prompts "
          f"({len(EXTRA_TOPICS)} more topics, {len(EXTRA_FORMS)} forms)")


if __name__ == "__main__":
    main()
