"""Regenerate the bundled datasets: ``python fastft/resources/data/make_datasets.py``.

Every example is produced from templates and word lists written for fastft (see LICENSE);
nothing is copied from a third-party dataset. The script is deterministic (fixed seed), so
re-running it reproduces ``instructions.jsonl`` and ``sentiment.jsonl`` byte for byte.

* ``instructions.jsonl``: alpaca-style rows ``{"instruction", "input", "output"}`` with short
  answers (arithmetic, unit conversion, string tasks, ML definitions, rewriting, classification,
  facts). About 400 rows.
* ``sentiment.jsonl``: ``{"text", "label"}`` rows, label in positive/negative/neutral. About 360 rows.
"""
from __future__ import annotations

import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 1234

ML_TERMS = {
    "overfitting": "When a model fits the training data so closely, noise included, that it does worse on new data.",
    "underfitting": "When a model is too simple to capture the pattern in the data, so it does badly even on training data.",
    "learning rate": "The step size the optimizer uses when it updates the weights from the gradient.",
    "gradient descent": "An optimization method that repeatedly moves the parameters a small step against the gradient of the loss.",
    "epoch": "One full pass over the training dataset.",
    "batch size": "The number of examples processed together before one weight update.",
    "loss function": "A function that measures how far the model's predictions are from the targets; training minimises it.",
    "cross-entropy": "A loss that compares a predicted probability distribution with the true labels; lower means better predictions.",
    "perplexity": "The exponential of the average cross-entropy per token; it measures how surprised a language model is by text.",
    "tokenizer": "A component that splits text into tokens and maps them to integer ids the model can read.",
    "embedding": "A learned vector that represents a token or item in a continuous space.",
    "attention": "A mechanism that lets each position weigh information from other positions when computing its output.",
    "transformer": "A neural network architecture built from self-attention and feed-forward layers.",
    "fine-tuning": "Continuing to train a pretrained model on a smaller dataset for a specific task.",
    "LoRA": "Low-rank adaptation: training two small matrices added to frozen weights instead of the full weights.",
    "quantization": "Storing weights or activations with fewer bits, such as 8-bit integers, to save memory and time.",
    "dropout": "A regularisation method that randomly zeroes some activations during training.",
    "weight decay": "A penalty that shrinks weights toward zero at each update to reduce overfitting.",
    "validation set": "Data held out from training and used to tune settings and detect overfitting.",
    "test set": "Data used only once at the end to estimate how well the final model generalises.",
    "precision": "Of the items predicted positive, the fraction that really are positive.",
    "recall": "Of the items that really are positive, the fraction the model found.",
    "F1 score": "The harmonic mean of precision and recall.",
    "confusion matrix": "A table counting predictions for each pair of true class and predicted class.",
    "softmax": "A function that turns a vector of scores into probabilities that are positive and sum to one.",
    "gradient clipping": "Scaling gradients down when their norm exceeds a threshold, to keep updates stable.",
    "warmup": "Starting training with a small learning rate and raising it over the first steps.",
    "checkpoint": "A saved copy of the model and optimizer state that training can resume from.",
    "inference": "Using a trained model to make predictions on new inputs.",
    "activation function": "A non-linear function applied to a layer's output, such as ReLU or GELU.",
    "backpropagation": "The algorithm that computes gradients of the loss with respect to every weight using the chain rule.",
    "regularization": "Any technique that discourages a model from becoming too complex, to improve generalisation.",
    "hyperparameter": "A setting chosen before training, such as the learning rate or batch size, rather than learned.",
    "language model": "A model that assigns probabilities to sequences of tokens, usually by predicting the next token.",
    "mixed precision": "Training with lower-precision numbers such as bf16 for speed while keeping sensitive values in fp32.",
    "gradient accumulation": "Summing gradients over several small batches before one update, to simulate a larger batch.",
    "early stopping": "Stopping training when the validation metric stops improving.",
    "classification": "Predicting which of a fixed set of categories an input belongs to.",
    "regression": "Predicting a continuous number from an input.",
    "prompt": "The input text given to a language model to condition its output.",
}

ANTONYMS = [("hot", "cold"), ("fast", "slow"), ("big", "small"), ("early", "late"), ("happy", "sad"),
            ("open", "closed"), ("light", "dark"), ("strong", "weak"), ("full", "empty"), ("high", "low"),
            ("easy", "difficult"), ("young", "old"), ("loud", "quiet"), ("rich", "poor"), ("wet", "dry"),
            ("first", "last"), ("inside", "outside"), ("buy", "sell"), ("win", "lose"), ("push", "pull")]
PLURALS = [("cat", "cats"), ("box", "boxes"), ("child", "children"), ("mouse", "mice"), ("city", "cities"),
           ("knife", "knives"), ("tooth", "teeth"), ("bus", "buses"), ("leaf", "leaves"), ("person", "people"),
           ("tomato", "tomatoes"), ("sheep", "sheep"), ("woman", "women"), ("baby", "babies"), ("foot", "feet")]
PAST = [("walk", "walked"), ("go", "went"), ("eat", "ate"), ("see", "saw"), ("write", "wrote"), ("run", "ran"),
        ("play", "played"), ("take", "took"), ("make", "made"), ("think", "thought"), ("bring", "brought"),
        ("swim", "swam"), ("read", "read"), ("sing", "sang"), ("build", "built")]
CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Canada", "Ottawa"), ("Egypt", "Cairo"),
            ("Kenya", "Nairobi"), ("Brazil", "Brasilia"), ("Spain", "Madrid"), ("Norway", "Oslo"),
            ("Australia", "Canberra"), ("Germany", "Berlin"), ("Peru", "Lima"), ("Portugal", "Lisbon"),
            ("Poland", "Warsaw"), ("Greece", "Athens"), ("Ireland", "Dublin"), ("Mexico", "Mexico City"),
            ("India", "New Delhi"), ("Chile", "Santiago"), ("Sweden", "Stockholm")]
FRUITS = ["apple", "banana", "cherry", "mango", "pear", "plum", "grape", "peach", "kiwi", "lemon"]
VEGETABLES = ["carrot", "potato", "onion", "spinach", "cabbage", "broccoli", "lettuce", "celery", "leek", "radish"]
ANIMALS = {"dog": "mammal", "eagle": "bird", "salmon": "fish", "frog": "amphibian", "snake": "reptile",
           "whale": "mammal", "sparrow": "bird", "shark": "fish", "lizard": "reptile", "owl": "bird",
           "horse": "mammal", "newt": "amphibian", "tuna": "fish", "turtle": "reptile", "bat": "mammal"}
WORDS = ["planet", "garden", "window", "rocket", "silver", "market", "pencil", "forest", "bridge", "candle",
         "python", "tensor", "kernel", "matrix", "vector", "dragon", "orange", "castle", "rabbit", "summer"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
COLOURS = {"red": "warm", "orange": "warm", "yellow": "warm", "blue": "cool", "green": "cool", "purple": "cool"}


def _arithmetic(rng: random.Random) -> dict:
    op = rng.choice("+-*")
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    if op == "-" and b > a:
        a, b = b, a
    if op == "*":
        b = rng.randint(2, 12)
    result = {"+": a + b, "-": a - b, "*": a * b}[op]
    form = rng.randrange(3)
    if form == 0:
        return {"instruction": f"What is {a} {op} {b}?", "input": "", "output": f"{a} {op} {b} = {result}."}
    if form == 1:
        return {"instruction": "Calculate the result of the expression.", "input": f"{a} {op} {b}",
                "output": str(result)}
    words = {"+": "plus", "-": "minus", "*": "times"}[op]
    return {"instruction": f"How much is {a} {words} {b}?", "input": "", "output": f"{a} {words} {b} is {result}."}


def _conversion(rng: random.Random) -> dict:
    kind = rng.randrange(6)
    if kind == 0:
        km = rng.randint(1, 50)
        return {"instruction": f"Convert {km} kilometres to metres.", "input": "", "output": f"{km} km = {km * 1000} m."}
    if kind == 1:
        h = rng.randint(1, 24)
        return {"instruction": "How many minutes are in the given number of hours?", "input": f"{h} hours",
                "output": f"{h * 60} minutes."}
    if kind == 2:
        kg = rng.randint(1, 40)
        return {"instruction": f"Convert {kg} kg to grams.", "input": "", "output": f"{kg} kg = {kg * 1000} g."}
    if kind == 3:
        c = rng.choice(range(-20, 45, 5))
        f = c * 9 / 5 + 32
        f_txt = f"{f:g}"
        return {"instruction": f"Convert {c} degrees Celsius to Fahrenheit.", "input": "",
                "output": f"{c} °C is {f_txt} °F."}
    if kind == 4:
        m = rng.randint(2, 30) * 10
        return {"instruction": "Convert the length from centimetres to metres.", "input": f"{m} cm",
                "output": f"{m / 100:g} m"}
    d = rng.randint(1, 10)
    return {"instruction": f"How many hours are there in {d} day{'s' if d > 1 else ''}?", "input": "",
            "output": f"{d * 24} hours."}


def _string_task(rng: random.Random) -> dict:
    w = rng.choice(WORDS)
    kind = rng.randrange(6)
    if kind == 0:
        return {"instruction": "Reverse the letters of the word.", "input": w, "output": w[::-1]}
    if kind == 1:
        return {"instruction": "Write the word in upper case.", "input": w, "output": w.upper()}
    if kind == 2:
        return {"instruction": f"How many letters does the word \"{w}\" have?", "input": "",
                "output": f"\"{w}\" has {len(w)} letters."}
    if kind == 3:
        ws = rng.sample(WORDS, 4)
        return {"instruction": "Sort these words alphabetically.", "input": ", ".join(ws),
                "output": ", ".join(sorted(ws))}
    if kind == 4:
        letter = rng.choice(sorted(set(w)))
        n = w.count(letter)
        return {"instruction": f"How many times does the letter '{letter}' appear in \"{w}\"?", "input": "",
                "output": f"{n} time{'s' if n > 1 else ''}."}
    return {"instruction": "What is the first letter of the word?", "input": w, "output": w[0]}


def _definition(term: str, text: str, form: int) -> dict:
    forms = [f"Define {term} in one sentence.", f"What does \"{term}\" mean in machine learning?",
             "Explain this machine learning term briefly."]
    inp = term if form == 2 else ""
    return {"instruction": forms[form], "input": inp, "output": text}


def _rewrite(rng: random.Random) -> dict:
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.choice(ANTONYMS)
        return {"instruction": "Give the opposite of the word.", "input": a, "output": b}
    if kind == 1:
        s, p = rng.choice(PLURALS)
        return {"instruction": "Write the plural form of the noun.", "input": s, "output": p}
    v, past = rng.choice(PAST)
    return {"instruction": f"Rewrite the sentence in the past tense: \"I {v} every day.\"", "input": "",
            "output": f"I {past} every day."}


def _classify(rng: random.Random, sentiment_rows: list[dict]) -> dict:
    kind = rng.randrange(5)
    if kind == 0:
        n = rng.randint(1, 999)
        return {"instruction": "Is the number even or odd?", "input": str(n), "output": "even" if n % 2 == 0 else "odd"}
    if kind == 1:
        item = rng.choice(FRUITS + VEGETABLES)
        return {"instruction": "Is this a fruit or a vegetable?", "input": item,
                "output": "fruit" if item in FRUITS else "vegetable"}
    if kind == 2:
        animal = rng.choice(sorted(ANIMALS))
        return {"instruction": "Which class of animal is this: mammal, bird, fish, reptile or amphibian?",
                "input": animal, "output": ANIMALS[animal]}
    if kind == 3:
        row = rng.choice(sentiment_rows)
        return {"instruction": "Classify the sentiment of the review as positive, negative or neutral.",
                "input": row["text"], "output": row["label"]}
    a, b = rng.sample(range(1, 500), 2)
    return {"instruction": f"Which number is larger, {a} or {b}?", "input": "", "output": str(max(a, b))}


def _fact(rng: random.Random) -> dict:
    kind = rng.randrange(3)
    if kind == 0:
        country, capital = rng.choice(CAPITALS)
        return {"instruction": f"What is the capital of {country}?", "input": "",
                "output": f"The capital of {country} is {capital}."}
    if kind == 1:
        i = rng.randrange(7)
        return {"instruction": f"Which day comes after {DAYS[i]}?", "input": "", "output": DAYS[(i + 1) % 7]}
    colour = rng.choice(sorted(COLOURS))
    return {"instruction": "Is this colour usually called warm or cool?", "input": colour, "output": COLOURS[colour]}


# Sentiment sentences are composed from subjects and judgements we wrote; the neutral set states facts.
SUBJECTS = ["The hotel room", "This laptop", "The pasta", "The new update", "Customer support", "The movie",
            "The delivery", "This jacket", "The concert", "The museum tour", "The app", "The coffee",
            "The train ride", "This book", "The headphones", "The workshop", "The bakery", "The game"]
POSITIVE = ["was wonderful and I would happily come back.", "exceeded every expectation I had.",
            "works perfectly and was easy to set up.", "made my whole week better.",
            "is fantastic value for the price.", "was friendly, quick and genuinely helpful.",
            "is the best I have tried in years.", "felt thoughtful and well made.",
            "was a real delight from start to finish.", "impressed the whole family."]
NEGATIVE = ["was a complete waste of money.", "broke after two days and nobody helped.",
            "was slow, rude and disappointing.", "is far worse than the reviews claimed.",
            "left me frustrated and annoyed.", "arrived late and damaged.",
            "is confusing and crashes constantly.", "was cold, bland and overpriced.",
            "ruined what should have been a nice evening.", "is something I regret buying."]
NEUTRAL = ["opens at nine in the morning.", "comes in three different colours.", "was delivered on Tuesday.",
           "lasts about two hours.", "is located on the second floor.", "was updated last month.",
           "has a blue logo on the front.", "is sold in most large stores.",
           "uses the same charger as the previous model.", "requires a reservation on weekends."]
POS_SHORT = ["Absolutely loved it!", "Great service, thank you.", "Highly recommended.", "Five stars, no doubts.",
             "What a pleasant surprise.", "Brilliant, just brilliant."]
NEG_SHORT = ["Terrible experience.", "Never again.", "Awful, simply awful.", "Do not buy this.",
             "Very disappointed.", "Worst purchase ever."]
NEU_SHORT = ["The package had two boxes.", "It is twenty centimetres long.", "The store closes at six.",
             "I ordered it on Monday.", "The manual is in English and French.", "It weighs about one kilogram."]


def make_sentiment(rng: random.Random) -> list[dict]:
    rows = []
    for label, endings, short in (("positive", POSITIVE, POS_SHORT), ("negative", NEGATIVE, NEG_SHORT),
                                  ("neutral", NEUTRAL, NEU_SHORT)):
        pairs = [(s, e) for s in SUBJECTS for e in endings]
        for s, e in rng.sample(pairs, 114):
            rows.append({"text": f"{s} {e}", "label": label})
        rows += [{"text": t, "label": label} for t in short]
    rng.shuffle(rows)
    return rows


def make_instructions(rng: random.Random, sentiment_rows: list[dict]) -> list[dict]:
    rows = []
    for i, (term, text) in enumerate(ML_TERMS.items()):
        rows.append(_definition(term, text, i % 3))
    makers = [_arithmetic, _conversion, _string_task, _rewrite, _fact]
    for m in makers:
        rows += [m(rng) for _ in range(80)]
    rows += [_classify(rng, sentiment_rows) for _ in range(80)]
    # Drop accidental duplicates (the same template and draw twice) so every row is distinct.
    seen, unique = set(), []
    for r in rows:
        key = (r["instruction"], r["input"])
        if key not in seen:
            seen.add(key)
            unique.append(r)
    rng.shuffle(unique)
    return unique


def _write_jsonl(path: str, rows: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main() -> None:
    rng = random.Random(SEED)
    sentiment = make_sentiment(rng)
    instructions = make_instructions(rng, sentiment)
    _write_jsonl(os.path.join(HERE, "sentiment.jsonl"), sentiment)
    _write_jsonl(os.path.join(HERE, "instructions.jsonl"), instructions)
    print(f"wrote {len(instructions)} instructions, {len(sentiment)} sentiment rows")


if __name__ == "__main__":
    main()
