"""Writes train.jsonl and dev.jsonl for the support-pipeline example (run once; output committed).

Each situation is a hand-written problem with its category and the affected system (named in
the text); each is told twice, with different urgency cues, and every row labels every step's
outputs: category; system and urgency; a reference first reply. Dev situations never appear in
train (rows of one situation share a `group`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# category -> (system, problem told around it)
SITUATIONS: dict[str, list[tuple[str, str]]] = {
    "network": [
        ("VPN", "the VPN disconnects every few minutes when I work from home"),
        ("Wi-Fi", "the Wi-Fi in the third floor meeting rooms keeps dropping"),
        ("DNS", "internal hostnames no longer resolve, DNS seems broken"),
        ("guest network", "the guest network does not show up on visitors' phones"),
        ("proxy", "the proxy resets every connection to external sites"),
        ("file server", "pinging the file server times out from every desk"),
        ("site-to-site tunnel", "the site-to-site tunnel to the Lyon office is down"),
        ("access point", "the access point near reception keeps rebooting"),
        ("SFTP server", "connections to the SFTP server are refused on port 22"),
        ("firewall", "the firewall drops connections to our payment gateway"),
        ("switch", "the switch in the server room flashes amber and half the floor is offline"),
        ("DHCP", "new devices get no IP address, DHCP looks exhausted"),
    ],
    "hardware": [
        ("laptop battery", "my laptop battery drains from full to empty in under an hour"),
        ("monitor", "my external monitor flickers and then goes black"),
        ("docking station", "the docking station no longer charges my laptop"),
        ("keyboard", "several keys on my keyboard stopped working"),
        ("printer", "the printer on floor 2 has a jam that will not clear, a roller is broken"),
        ("webcam", "the webcam only shows a black image"),
        ("projector", "the projector in boardroom A shows no image"),
        ("hard drive", "the hard drive is clicking and the laptop takes ages to boot"),
        ("headset", "my headset microphone crackles and the cable looks damaged"),
        ("UPS", "the UPS under my desk beeps constantly"),
        ("barcode scanner", "the barcode scanner in shipping does not light up any more"),
        ("NAS", "one disk in the NAS shows a red failure light"),
    ],
    "software": [
        ("Excel", "Excel crashes every time I open a file with macros"),
        ("Outlook", "Outlook is stuck on updating inbox and never finishes"),
        ("Teams", "Teams shows a blank white window after it starts"),
        ("ERP client", "the ERP client throws a runtime error on the monthly report"),
        ("Chrome", "Chrome freezes when I open more than a few tabs"),
        ("accounting software", "the accounting software will not start, a DLL is missing"),
        ("Zoom", "Zoom says my client version is no longer supported"),
        ("antivirus agent", "the antivirus agent uses all the CPU all day"),
        ("SAP GUI", "SAP GUI hangs when I post an invoice"),
        ("Windows update", "the Windows update fails with error 0x80070002"),
        ("CRM app", "the CRM app crashes on my phone since the update"),
        ("reporting tool", "the reporting tool exports empty PDF files"),
    ],
    "access": [
        ("password", "my password expired and the reset link does not work"),
        ("MFA", "I changed phones and MFA codes are no longer accepted"),
        ("shared drive", "I need write permission on the finance shared drive"),
        ("account", "my account is locked after too many attempts"),
        ("Salesforce", "the new hire cannot log in to Salesforce, no licence assigned"),
        ("admin rights", "I need admin rights on my laptop to install a driver"),
        ("mailbox", "I need access to the support team's shared mailbox"),
        ("badge", "my badge no longer opens the lab door"),
        ("Jira", "Jira says I do not have permission to see the project"),
        ("SSO", "single sign-on loops back to the login page"),
        ("VPN certificate", "my VPN certificate login is rejected since my name change"),
        ("GitHub", "please remove a leaver's access to the company GitHub"),
    ],
    "security": [
        ("email", "I got an email asking me to confirm my password on a strange site"),
        ("laptop", "my laptop was stolen from my car last night"),
        ("antivirus", "the antivirus flagged a trojan in my downloads folder"),
        ("account", "someone logged in to my account from another country"),
        ("USB stick", "I found a USB stick in the car park and plugged it in"),
        ("browser", "pop-ups say my computer is infected and to call a number"),
        ("phone", "I lost my work phone on the train"),
        ("file share", "files on the file share are being renamed with a strange extension"),
        ("invoice email", "an invoice email from a supplier asks us to change bank details"),
        ("MFA prompts", "I keep getting MFA prompts I did not ask for"),
        ("website", "our public website shows a defaced page"),
        ("API key", "an API key was pushed to a public repository"),
    ],
    "billing": [
        ("invoice", "this month's invoice charges us twice for the same licences"),
        ("subscription", "please cancel the design tool subscription we no longer use"),
        ("refund", "we are still waiting for the refund promised in March"),
        ("credit card", "the credit card on file expired and the renewal failed"),
        ("licence count", "we are billed for 50 licences but only have 30 users"),
        ("purchase order", "the invoice does not show our purchase order number"),
        ("phone bill", "the mobile phone bill has roaming charges nobody incurred"),
        ("VAT", "the invoice has the wrong VAT number"),
        ("cloud bill", "the cloud bill tripled this month without any change"),
        ("printer lease", "the printer lease invoice includes a machine we returned"),
        ("support contract", "the support contract renewal price doubled"),
        ("payment", "our payment bounced and the account shows as overdue"),
    ],
}

TEAMS = {
    "network": "network team", "hardware": "hardware team", "software": "software team",
    "access": "access team", "security": "security team", "billing": "billing team",
}  # fmt: skip
NEXT_STEP = {
    "high": "is on it now and will update you within the hour",
    "medium": "will look into it today",
    "low": "will look into it this week",
}
# Urgency cues, stated in the ticket (the extractor learns to read them).
CUES = {
    "high": ["URGENT: {p}, the whole team is blocked.", "{p} and nobody can work, please help asap.",
             "Production is affected: {p}. This is urgent!"],
    "medium": ["Hi, {p}. Could you take a look?", "Hello team, {p}. Thanks.",
               "{p}. Can someone check it?"],
    "low": ["No rush, but {p}.", "Whenever you have time: {p}.",
            "Low priority, {p}; it can wait until next week."],
}  # fmt: skip
SIGN_OFFS = ["", " Thanks, Ana", " -- Tom, Warehouse", " Regards, Priya (Finance)", " Cheers, Lee"]


def reply(category: str, system: str, urgency: str) -> str:
    return f"Thanks for reporting the {system} issue; the {TEAMS[category]} {NEXT_STEP[urgency]}."


def rows_for(category: str, system: str, problem: str, group: str, rng: random.Random) -> list:
    rows = []
    for urgency in rng.sample(list(CUES), 2):
        text = rng.choice(CUES[urgency]).format(p=problem) + rng.choice(SIGN_OFFS)
        rows.append({"ticket": text[0].upper() + text[1:], "category": category,
                     "system": system, "urgency": urgency,
                     "reply": reply(category, system, urgency), "group": group})  # fmt: skip
    return rows


def main() -> None:
    rng = random.Random(16)
    train, dev = [], []
    for category, situations in SITUATIONS.items():
        order = list(range(len(situations)))
        rng.shuffle(order)
        for rank, index in enumerate(order):
            system, problem = situations[index]
            rows = rows_for(category, system, problem, f"{category}-{index}", rng)
            (dev if rank < 4 else train).extend(rows)
    rng.shuffle(train)
    rng.shuffle(dev)
    here = Path(__file__).parent
    for name, rows in (("train", train), ("dev", dev)):
        with (here / f"{name}.jsonl").open("w") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
