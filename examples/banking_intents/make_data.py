"""Writes train.jsonl and dev.jsonl for the banking-intents example (run once; output committed).

Each message is one situation (what happened to the customer), told in one of several voices
with an optional greeting, a context line and a closing. Dev situations never appear in train,
so dev measures whether the model learned the intent, not the wording. Each dev row carries
`group` (its situation), so the calibration/test split keeps a situation's tellings on one side.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# intent -> (train situations, dev situations)
# fmt: off
SITUATIONS: dict[str, tuple[list[str], list[str]]] = {
    "card_arrival": (
        [
            "I ordered a new card two weeks ago and it still hasn't come",
            "how long does the replacement card take to be delivered?",
            "my card was supposed to arrive by Friday, nothing in the post yet",
            "the app says my card was dispatched but I never got it",
            "can you tell me where my new debit card is? it's been 10 days",
            "I moved house, will my new card be sent to the new address and when?",
            "still waiting for the physical card, I only have the virtual one",
            "is there a way to track the delivery of my card?",
            "the renewal card for my expiring one hasn't shown up",
            "ordered a card for my daughter's account last month, not here",
            "what's the usual delivery time for cards to Ireland?",
            "my card expires this week and the new one isn't here",
        ],
        [
            "it's been three weeks since I applied and no card in the mailbox",
            "when will the metal card I upgraded to be delivered?",
            "courier says delivered but there's no card in my letterbox",
            "do cards get shipped abroad? I'm waiting for mine in Portugal",
            "my replacement after the damaged one still hasn't arrived",
        ],
    ),
    "card_payment_fee_charged": (
        [
            "why was I charged a fee when I paid with my card at the supermarket?",
            "there's an extra 2 euro charge next to my card payment",
            "I paid by card in a shop and got a fee on top, what is that?",
            "you charged me a transaction fee for a card purchase, I thought it was free",
            "my card payment shows the amount plus a 1% fee",
            "a small fee appeared after I bought something online with my card",
            "why do card payments in the UK cost me extra?",
            "the restaurant bill on my card came with a fee I didn't expect",
            "I see a card fee on my statement for a normal purchase",
            "what's this 0.50 charge that came with my card payment?",
            "I was told card payments have no fees but I got charged one",
            "my card payment at the petrol station had an added fee",
        ],
        [
            "there's a charge labelled 'card fee' after my hotel payment",
            "why did paying for my flight by card cost me an extra fee?",
            "extra money was taken for a card purchase on top of the price",
            "I got billed a fee for a contactless payment, is that right?",
            "a fee was added to my online shopping card payment",
        ],
    ),
    "lost_or_stolen_card": (
        [
            "I lost my card somewhere in town yesterday",
            "my wallet was stolen with my bank card inside",
            "I think someone took my card at the bar, please block it",
            "can't find my card anywhere, what should I do?",
            "my bag was snatched on the train and my card was in it",
            "I left my card in a taxi",
            "my card was stolen, I need to freeze it now",
            "I dropped my card and now it's gone",
            "a stranger has my card, I saw them use it",
            "my phone case with the card in it went missing",
            "I misplaced my card during my trip",
            "someone pickpocketed me and took my card",
        ],
        [
            "my card fell out of my pocket at the concert",
            "I think my card was taken from my locker at the gym",
            "my flat was burgled and my cards were taken",
            "I can't remember where I put my card, please block it just in case",
            "my card is missing since the weekend",
        ],
    ),
    "declined_card_payment": (
        [
            "my card was declined at the supermarket even though I have money",
            "why won't my card work for online payments?",
            "the shop said my payment was refused",
            "I tried to pay for dinner and the card got declined",
            "card payment failed at the checkout with 'declined'",
            "my card keeps getting rejected on Amazon",
            "paying at the petrol station didn't go through, card declined",
            "why was my card payment blocked today?",
            "the terminal said 'transaction declined' twice",
            "I can't buy my train ticket, the card is declined",
            "my subscription payment by card was refused",
            "card was denied at the hotel check-in",
        ],
        [
            "tried to pay my phone bill by card and it said declined",
            "the card doesn't go through at any shop today",
            "my payment at the pharmacy was refused, there's enough balance",
            "online store says my card was declined by the bank",
            "the taxi's card machine rejected my card",
        ],
    ),
    "pending_transfer": (
        [
            "I sent money to my friend yesterday and it's still pending",
            "my transfer says processing, when will it arrive?",
            "how long until the money I sent reaches the other account?",
            "the transfer I made on Monday hasn't landed yet, it says in progress",
            "why is my bank transfer still showing as pending?",
            "I paid my landlord but the transfer is still on its way",
            "my international transfer has been processing for 3 days",
            "the money left my account but my mum hasn't received it yet",
            "transfer status has been 'pending' since this morning",
            "when does a SEPA transfer usually clear?",
            "I moved money to my savings at another bank, still not there",
            "my payment to a supplier is stuck in processing",
        ],
        [
            "sent a transfer on Friday, it still says in progress",
            "how many days does a transfer to the US take? mine hasn't arrived",
            "the recipient is still waiting for my transfer from yesterday",
            "my transfer is taking longer than usual, still processing",
            "the app shows my payment to my brother as not completed yet",
        ],
    ),
    "failed_transfer": (
        [
            "my transfer failed and the money came back",
            "why was my bank transfer rejected?",
            "I tried to send money but it says transfer failed",
            "the transfer to my landlord bounced back to my account",
            "my international transfer was returned by the other bank",
            "the app says my transfer couldn't be completed",
            "transfer got cancelled and I don't know why",
            "money I sent was sent back, the payment was rejected",
            "my transfer to a new recipient didn't go through",
            "I got a notification that my transfer was declined",
            "the bank transfer failed with 'invalid account'",
            "why did my payment to my friend fail?",
        ],
        [
            "my transfer was refused by the receiving bank",
            "the money I transferred returned to me after two days",
            "I keep getting 'transfer unsuccessful' when sending money",
            "my payment to the IBAN I entered was rejected",
            "the transfer to my savings account was reversed",
        ],
    ),
    "refund_not_showing_up": (
        [
            "the shop refunded me a week ago but I don't see the money",
            "where is my refund? the merchant says they sent it",
            "I returned a jacket and the refund isn't in my account",
            "my refund from the airline hasn't appeared yet",
            "the seller issued a refund but my balance didn't change",
            "how long do refunds take to show up?",
            "I was promised a refund, it's not on my statement",
            "a cancelled order was refunded but nothing came back to me",
            "the refund for my hotel booking is missing",
            "Amazon says the refund is done but I can't see it",
            "my refund for the concert tickets never arrived",
            "the store's refund isn't showing in the app",
        ],
        [
            "I cancelled the subscription and was told I'd get money back, still nothing",
            "the refund from the online shop is not in my transactions",
            "my money for the returned shoes hasn't come back",
            "the restaurant reversed the charge but I don't see it",
            "the merchant's refund confirmation is two weeks old and no money",
        ],
    ),
    "exchange_rate": (
        [
            "what exchange rate do you use for dollars?",
            "the rate I got converting to euros was worse than Google's",
            "how much is 100 pounds in euros with your rate?",
            "why was my currency exchange rate so bad?",
            "do you offer the real interbank rate?",
            "what rate applies when I spend in yen abroad?",
            "the conversion rate on my holiday purchases seems off",
            "is the exchange rate better on weekdays?",
            "how do you calculate the rate for foreign currencies?",
            "I want to exchange money, what's today's rate for Swiss francs?",
            "the rate changed between my quote and my exchange",
            "can I see the rate before converting currency?",
        ],
        [
            "which rate will I get if I convert euros to zloty?",
            "my card purchase in dollars used a strange conversion rate",
            "is your currency rate updated live?",
            "why does the app's rate differ from the one on the news?",
            "what's the rate for converting my salary from pounds?",
        ],
    ),
}
# fmt: on

GREETINGS = ["", "", "Hi,", "Hello,", "hey", "Good morning.", "Hi there!"]
CONTEXTS = ["", "", "", " I've been a customer for years.", " This is urgent.",
            " I'm on holiday right now.", " Please help."]  # fmt: skip
CLOSINGS = ["", "", "Thanks", "Thank you!", "thx", "Cheers, Tom", "Regards, Ana"]


def render(situation: str, rng: random.Random) -> str:
    text = situation[0].upper() + situation[1:] if rng.random() < 0.6 else situation
    context = rng.choice(CONTEXTS)
    if context and text[-1] not in "?!.":
        text += "."
    parts = [rng.choice(GREETINGS), (text + context).strip(), rng.choice(CLOSINGS)]
    return " ".join(p for p in parts if p)


def main() -> None:
    rng = random.Random(20261204)
    here = Path(__file__).parent
    train: list[dict[str, str]] = []
    dev: list[dict[str, str]] = []
    for intent, (train_situations, dev_situations) in SITUATIONS.items():
        for situation in train_situations:  # 12 situations x 2 tellings = 24 rows
            train += [{"message": render(situation, rng), "intent": intent} for _ in range(2)]
        for number, situation in enumerate(dev_situations):  # 5 x 3 = 15 rows
            group = f"{intent}-{number}"
            dev += [{"message": render(situation, rng), "intent": intent, "group": group}
                    for _ in range(3)]  # fmt: skip
    rng.shuffle(train)
    rng.shuffle(dev)
    for name, rows in (("train", train), ("dev", dev)):
        with (here / f"{name}.jsonl").open("w") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(train)} train and {len(dev)} dev messages")


if __name__ == "__main__":
    main()
