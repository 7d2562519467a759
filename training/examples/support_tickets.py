"""A synthetic task for `loraplex train`: customer support tickets to a JSON routing record.

Each ticket is assembled from parts drawn with a seeded RNG (a product named one of several
ways, a symptom, an urgency cue, a tone, and noise: greetings, order numbers, sign-offs,
typos, lower case, a subject line), and its answer follows from those parts alone:

    team       billing | technical | account | shipping   the kind of symptom
    urgency    low | medium | high                        an urgency cue (now, this week, no rush)
    product    the product's canonical name               however the ticket names it
    sentiment  negative | neutral | positive              the tone of the ticket

Records are chats: INSTRUCTION as the system message, the ticket as the user's, the JSON as
the assistant's; ask the served adapter with the same system message (`loraplex generate
--chat --system ...`). The same seed gives the same files, byte for byte; train and eval
tickets never share a text (eval tickets are new combinations of the same phrase pools).

    python training/examples/support_tickets.py          # support-tickets/{train,eval}.jsonl
    loraplex train --config training/examples/support_tickets.yaml
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("support_tickets")

INSTRUCTION = (
    "Route this support ticket. Answer with JSON only (team, urgency, product, sentiment)."
)
KEYS = ("team", "urgency", "product", "sentiment")

# canonical name -> ways a customer writes it
PRODUCTS: dict[str, tuple[str, ...]] = {
    "Nimbus Router": ("Nimbus Router", "Nimbus router", "Nimbus wifi router", "nimbus router"),
    "Aurora Lamp": ("Aurora Lamp", "Aurora smart lamp", "Aurora lamp", "aurora lamp"),
    "Pulse Watch": ("Pulse Watch", "Pulse smartwatch", "Pulse watch", "pulse watch"),
    "Drift Earbuds": ("Drift Earbuds", "Drift earbuds", "Drift buds", "drift earbuds"),
    "Atlas Laptop": ("Atlas Laptop", "Atlas 14 laptop", "Atlas laptop", "atlas laptop"),
    "Kite Camera": ("Kite Camera", "Kite security camera", "Kite cam", "kite camera"),
    "Harbor Thermostat": (
        "Harbor Thermostat",
        "Harbor smart thermostat",
        "Harbor thermostat",
        "harbor thermostat",
    ),
    "Fable Reader": ("Fable Reader", "Fable e-reader", "Fable reader", "fable reader"),
}

# team -> symptoms ({p}: the product as the customer names it)
SYMPTOMS: dict[str, tuple[str, ...]] = {
    "billing": (
        "I was charged twice for my {p}.",
        "The invoice for my {p} shows the wrong amount.",
        "I want a refund for the {p} I returned two weeks ago.",
        "My card was billed again after I cancelled the {p} plan.",
        "The discount code was not applied when I paid for the {p}.",
        "Why did the monthly price of my {p} subscription go up?",
        "There is a charge for a {p} warranty I never ordered.",
        "I need a VAT receipt for the {p} I paid for.",
        "My payment for the {p} was declined but the money left my account.",
        "I was promised a price match on the {p} and never got the credit.",
    ),
    "technical": (
        "My {p} will not turn on anymore.",
        "The {p} keeps disconnecting from the wifi.",
        "After the last firmware update my {p} is stuck on a black screen.",
        "The battery of my {p} drains in about an hour.",
        "The app crashes every time I try to pair the {p}.",
        "My {p} makes a loud buzzing noise.",
        "The {p} gets really hot and then restarts by itself.",
        "The {p} does not respond to any button press.",
        "Bluetooth pairing with the {p} fails with error 42.",
        "The display of my {p} flickers constantly.",
    ),
    "account": (
        "I cannot log in to the {p} app, it says my password is wrong.",
        "The password reset email for my {p} account never arrives.",
        "I need to change the email address on the account I use for my {p}.",
        "The two-factor code for my {p} account is always rejected.",
        "My account got locked after I set up the {p}.",
        "Please delete my account and all data linked to my {p}.",
        "Someone else seems to have logged in to my account and removed my {p}.",
        "I want to transfer my {p} to my partner's account.",
        "I cannot add a second user to the account that owns the {p}.",
        "My username shows someone else's name since I registered the {p}.",
    ),
    "shipping": (
        "My {p} order still has not arrived.",
        "The tracking number for my {p} does not work.",
        "The {p} arrived with a crushed box and a cracked case.",
        "I received a phone case instead of the {p} I ordered.",
        "The courier delivered my {p} to the wrong address.",
        "My {p} has been stuck in customs for ten days.",
        "The package with my {p} was marked delivered but it is not here.",
        "I need to change the delivery address for the {p} I ordered yesterday.",
        "Only half of my {p} order was in the parcel.",
        "The delivery of my {p} keeps getting rescheduled.",
    ),
}

URGENCY_CUES: dict[str, tuple[str, ...]] = {
    "high": (
        "This is urgent.",
        "Please fix this ASAP.",
        "I need this resolved today.",
        "I run my business on this and it is blocking everything.",
        "URGENT, please answer right away.",
        "I need this sorted before my flight tomorrow morning.",
        "This is the third time I am writing, I need an answer now.",
        "Please treat this as an emergency.",
    ),
    "medium": (
        "Please look into it this week.",
        "I would appreciate a fix this week.",
        "Could someone get back to me this week?",
        "Sometime this week would be good.",
        "Please sort it out this week.",
        "I need it working again by the end of the week.",
    ),
    "low": (
        "No rush on this.",
        "Whenever you have time is fine.",
        "Not a big deal, just letting you know.",
        "Low priority, I am just curious.",
        "Take your time, it can wait.",
        "No hurry at all, it can wait until next month.",
    ),
}

TONES: dict[str, tuple[str, ...]] = {
    "negative": (
        "This is ridiculous.",
        "I am really frustrated.",
        "Worst customer experience I have ever had.",
        "I am very disappointed with your company.",
        "Honestly, I am fed up with this.",
        "Completely unacceptable.",
        "I regret buying anything from you.",
        "I am furious about this.",
    ),
    "neutral": (
        "",
        "",
        "",
        "See the details below.",
        "I bought it in March.",
        "It is the model I bought last year.",
    ),
    "positive": (
        "I love your products otherwise!",
        "Thanks so much, you are always great.",
        "Really happy with your service so far.",
        "I appreciate your help a lot!",
        "Big fan of your brand, keep it up.",
        "Your support team has always been wonderful.",
    ),
}

GREETINGS = ("", "Hi,", "Hello,", "Hello team,", "Hey there,", "Dear support,", "Good morning,")
SIGN_OFFS = ("", "", "Thanks", "Regards, Sam", "Best, Priya", "- J. Moreau", "Cheers, Tom")
SUBJECTS = {
    "billing": ("Payment problem", "Question about a charge", "Invoice"),
    "technical": ("Device problem", "Not working", "Help with my device"),
    "account": ("Account access", "Login issue", "My account"),
    "shipping": ("Where is my order", "Delivery problem", "Order"),
}


@dataclass(frozen=True)
class Ticket:
    text: str
    team: str
    urgency: str
    product: str
    sentiment: str

    def answer(self) -> str:
        return json.dumps({k: getattr(self, k) for k in KEYS})

    def record(self) -> dict[str, list[dict[str, str]]]:
        """Chat form: the instruction as the system message (it replaces the template's
        default one, so it costs no extra tokens), the ticket as the user's."""
        return {
            "messages": [
                {"role": "system", "content": INSTRUCTION},
                {"role": "user", "content": self.text},
                {"role": "assistant", "content": self.answer()},
            ]
        }


def typo(sentence: str, rng: random.Random, protected: str) -> str:
    """Swap two adjacent letters in one longer word that is not part of the product name."""
    words = sentence.split(" ")
    keep = set(protected.lower().split())
    choices = [
        i for i, w in enumerate(words) if len(w) > 4 and w.isalpha() and w.lower() not in keep
    ]
    if not choices:
        return sentence
    i = rng.choice(choices)
    word = words[i]
    j = rng.randrange(1, len(word) - 2)
    words[i] = word[:j] + word[j + 1] + word[j] + word[j + 2 :]
    return " ".join(words)


def make_ticket(rng: random.Random) -> Ticket:
    team = rng.choice(sorted(SYMPTOMS))
    urgency = rng.choices(("low", "medium", "high"), weights=(1, 1, 1))[0]
    sentiment = rng.choices(("negative", "neutral", "positive"), weights=(1, 1, 1))[0]
    product = rng.choice(sorted(PRODUCTS))
    alias = rng.choice(PRODUCTS[product])
    symptom = rng.choice(SYMPTOMS[team]).format(p=alias)
    if rng.random() < 0.15:
        symptom = typo(symptom, rng, alias)
    extras = [rng.choice(URGENCY_CUES[urgency]), rng.choice(TONES[sentiment])]
    if rng.random() < 0.3:
        extras.append(f"Order #{rng.randrange(10000, 99999)}.")
    rng.shuffle(extras)
    body = [symptom, *extras] if rng.random() < 0.7 else [*extras, symptom]
    text = " ".join(s for s in body if s)
    greeting, sign_off = rng.choice(GREETINGS), rng.choice(SIGN_OFFS)
    if greeting:
        text = f"{greeting} {text}" if rng.random() < 0.5 else f"{greeting}\n{text}"
    if sign_off:
        text = f"{text}\n{sign_off}"
    if rng.random() < 0.2:
        text = f"Subject: {rng.choice(SUBJECTS[team])}\n\n{text}"
    if rng.random() < 0.1:
        text = text.lower()
    return Ticket(text, team, urgency, product, sentiment)


def generate(n_train: int, n_eval: int, seed: int) -> tuple[list[Ticket], list[Ticket]]:
    """Distinct tickets: the eval split first (so it does not move with n_train), then train."""
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: list[list[Ticket]] = [[], []]
    for split, n in ((splits[1], n_eval), (splits[0], n_train)):
        attempts = 0
        while len(split) < n:
            attempts += 1
            if attempts > 100 * n:
                raise RuntimeError(f"could not draw {n} distinct tickets")
            ticket = make_ticket(rng)
            if ticket.text not in seen:
                seen.add(ticket.text)
                split.append(ticket)
    return splits[0], splits[1]


def write_jsonl(path: Path, tickets: list[Ticket]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for t in tickets:
            f.write(json.dumps(t.record(), ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("support-tickets"), help="output dir")
    parser.add_argument("--train", type=int, default=500, help="training examples")
    parser.add_argument("--eval", type=int, default=64, help="held-out examples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-v", "--verbose", action="store_true", help="log a few samples")
    args = parser.parse_args(argv)
    if args.train < 1 or args.eval < 1:
        parser.error("--train and --eval must be at least 1")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    train, held_out = generate(args.train, args.eval, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "eval.jsonl", held_out)
    for key in KEYS:
        counts = Counter(getattr(t, key) for t in train)
        log.info("train %s: %s", key, dict(sorted(counts.items())))
    for t in train[:3]:
        log.debug("sample: %r -> %s", t.text, t.answer())
    sys.stdout.write(
        f"{len(train)} train and {len(held_out)} eval tickets (seed {args.seed}) in "
        f"{args.out}/train.jsonl and {args.out}/eval.jsonl\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
