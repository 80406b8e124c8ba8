# ruff: noqa: E501 - one situation per line reads better than wrapped data
"""Writes train.jsonl and dev.jsonl for the inbox-routing example (run once; output committed).

Each email is one situation (a subject and what the sender wants), told in one of several
voices with a greeting, an optional context line and a sign-off. Dev situations never appear in
train: dev measures whether the model learned the decision, not the wording. Each dev row
carries `group` (its situation), so the calibration/test split keeps a situation's tellings on
one side.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# department -> (train situations, dev situations); a situation is (subject, body, needs_reply).
Situation = tuple[str, str, bool]
# fmt: off
SITUATIONS: dict[str, tuple[list[Situation], list[Situation]]] = {
    "sales": (
        [
            ("Pricing for 50 seats", "could you send us a quote for 50 user licences on the annual plan?", True),
            ("Demo request", "we'd like a product demo for our operations team next week, what times work?", True),
            ("Volume discount?", "is there a discount if we commit to three years instead of one?", True),
            ("Renewal coming up", "our contract ends in March, can we talk about renewing with more users?", True),
            ("Adding a second site", "we want to roll out to our Hamburg office too, who should I talk to about an order?", True),
            ("Signed order form", "attached is the signed order form for the enterprise tier, as agreed on the call.", False),
            ("Thanks for the presentation", "thank you for the presentation yesterday, the team found it very useful.", False),
            ("Purchase approved", "just letting you know our board approved the purchase, the PO will follow from procurement.", False),
            ("Trial feedback", "we finished the 30-day trial and decided to go ahead, contract signed by our CEO today.", False),
            ("Meeting confirmed", "confirming our call with your account manager on Thursday at 10.", False),
            ("Upgrade to enterprise", "what would it cost to move our 30 users from the standard plan to enterprise?", True),
            ("Nonprofit pricing", "do you have special pricing for registered charities?", True),
            ("Need a formal quote", "our procurement team needs a formal quote before they can raise a PO, can you prepare one?", True),
            ("PO number for our order", "for your records, the purchase order number for our new licences is PO-55812.", False),
            ("Decision postponed", "a heads-up that we've paused the purchase decision until next quarter, no need to follow up before then.", False),
        ],
        [
            ("Quote for the premium add-on", "how much would the analytics add-on cost for 120 users?", True),
            ("Partner programme", "we resell software in Spain, can we become a reseller of your product?", True),
            ("Order placed online", "we placed the order for 20 seats through the web shop this morning, no action needed.", False),
            ("Re: proposal", "we have accepted your proposal and will start onboarding next month, thanks.", False),
            ("Price list request", "could you send your current price list for the hardware bundles?", True),
            ("Extend the trial?", "our evaluation isn't finished, could you extend our trial by two weeks before we decide to buy?", True),
            ("Contract countersigned", "the renewal contract has been countersigned and returned to your account manager.", False),
            ("Budget approved", "good news, the budget for the rollout was approved today and our buyer will place the order.", False),
        ],
    ),
    "support": (
        [
            ("Can't log in", "since this morning the app says my password is wrong even after a reset, please help.", True),
            ("Export broken", "exporting a report to PDF gives an error 500, can you look into it?", True),
            ("How do I add users?", "where in the admin panel do I invite new colleagues to our workspace?", True),
            ("Sync not working", "the mobile app stopped syncing with the desktop version, what should I try?", True),
            ("Dashboard very slow", "dashboards take over a minute to load for everyone here, is something wrong?", True),
            ("Issue resolved", "the fix you suggested worked, the import runs fine now. You can close the ticket.", False),
            ("Scheduled maintenance notice", "automated notice: the platform will be under maintenance on Sunday 02:00-04:00 UTC.", False),
            ("Thanks for the quick fix", "thanks for restoring our data so quickly yesterday, much appreciated.", False),
            ("Ticket #4821 closed", "this is an automatic message: your support ticket #4821 has been closed.", False),
            ("Workaround is fine", "just an update: we'll use the CSV workaround until the bug fix ships, nothing else needed.", False),
            ("Password reset email never arrives", "I requested a password reset three times and no email came, can you help?", True),
            ("Can I undo a deletion?", "I accidentally deleted a project this morning, is there a way to restore it?", True),
            ("Bug report follow-up", "confirming the bug no longer happens after today's update, thanks.", False),
            ("Release notes", "automated: version 4.2 is now available, see the release notes for what changed.", False),
            ("Feature works great", "just wanted to say the new bulk edit feature saves us hours, great work.", False),
        ],
        [
            ("Notifications stopped", "none of us receive email notifications any more since Friday, can you check?", True),
            ("API returns 401", "our integration gets 401 unauthorized on every call with a fresh token, what changed?", True),
            ("Status page update", "automated: the incident affecting file uploads has been resolved.", False),
            ("All good now", "the calendar sync is working again on my side, thank you.", False),
            ("Uploads failing", "every upload over 10 MB fails with 'network error', can you look into it?", True),
            ("Two-factor setup", "how do I turn on two-factor authentication for all users in our workspace?", True),
            ("Outage over", "confirming that the service is back for us, thanks for the updates during the outage.", False),
            ("Request received", "automated: we received your request #9913 about the login error and will get back to you soon.", False),
        ],
    ),
    "finance": (
        [
            ("Invoice 2024-117 wrong amount", "the invoice charges us for 60 seats but we have 45, can you send a corrected one?", True),
            ("Refund request", "we were charged twice in May, please refund the duplicate payment.", True),
            ("Payment terms", "can we pay by bank transfer on 60-day terms instead of by card?", True),
            ("VAT number missing", "our VAT number is missing from the last three invoices, could you reissue them?", True),
            ("Where is our receipt?", "we paid last week but never received a receipt, can you send it?", True),
            ("Remittance advice", "please find attached the remittance advice for invoice 2024-203, paid today.", False),
            ("Payment sent", "FYI the outstanding balance was transferred this morning.", False),
            ("Supplier invoice attached", "attached is our invoice for the catering services in April, due in 30 days.", False),
            ("Direct debit set up", "confirming that the direct debit mandate is now active for our account.", False),
            ("Statement of account", "automated statement: your account balance is zero as of 31 May.", False),
            ("Invoice in euros?", "can future invoices be issued in euros instead of dollars?", True),
            ("Late payment fee", "why was a late fee added to our last invoice when we paid on time?", True),
            ("PO number on invoices", "could you add our PO number to the invoices from now on? our accounts team requires it.", True),
            ("Payment confirmation", "automated: we have received your payment of 1,200.00 EUR, thank you.", False),
            ("Bank details changed", "for your records, our bank details for supplier payments have changed, the new IBAN is in the attached letter.", False),
        ],
        [
            ("Overcharged on renewal", "the renewal invoice is 20% higher than the quote, can you explain or correct it?", True),
            ("Change billing address", "we moved offices, could you update the billing address on future invoices?", True),
            ("Credit note received", "we received the credit note, thanks, nothing further needed.", False),
            ("Invoice paid", "just to let you know invoice 2024-388 has been settled in full.", False),
            ("Split the invoice", "can you split the annual invoice into four quarterly payments?", True),
            ("Missing credit", "the credit you promised for the outage hasn't appeared on our invoice, can you check?", True),
            ("Invoice received", "we received invoice 2024-512 and it has been passed to accounts payable.", False),
            ("Annual statement", "automated: your annual statement of payments for 2024 is attached.", False),
        ],
    ),
    "hr": (
        [
            ("Application: backend developer", "I'd like to apply for the backend developer role, is the position still open?", True),
            ("Reference request", "could you confirm the employment dates of a former employee of yours, Maria Lopez?", True),
            ("Interview reschedule", "something came up, could we move my interview from Tuesday to Wednesday?", True),
            ("Internship question", "do you offer summer internships for engineering students?", True),
            ("Parental leave", "I'd like to know how to request parental leave starting in September.", True),
            ("Signed contract", "attached is my signed employment contract, I look forward to starting on the 1st.", False),
            ("Thank you for the interview", "thank you for the interview today, it was great to meet the team.", False),
            ("Withdrawing my application", "I've accepted another offer, so please withdraw my application. Thanks for your time.", False),
            ("Payslip portal notice", "automated: your payslips for May are available in the HR portal.", False),
            ("Sick note", "FYI I'm off sick today and tomorrow, my doctor's note is attached.", False),
            ("Payslip tax code", "my last payslip shows the wrong tax code, who can I talk to about correcting it?", True),
            ("Graduate programme", "when do applications open for next year's graduate programme?", True),
            ("Holiday request approved", "automated: your annual leave request for 12-16 August has been approved.", False),
            ("Farewell", "today is my last day at the company, thanks everyone for a wonderful five years.", False),
            ("Timesheet submitted", "automated: your timesheet for week 22 has been submitted to your manager.", False),
        ],
        [
            ("Open positions in sales?", "are you hiring account executives? I'd love to send my CV.", True),
            ("Relocation support", "does the company help with relocation costs for new hires from abroad?", True),
            ("Offer accepted", "I'm happy to confirm I accept the offer, signed letter attached.", False),
            ("Training completed", "automated: you completed the mandatory safety training.", False),
            ("Work permit question", "I'm a non-EU applicant, would you sponsor a work permit for the data analyst role?", True),
            ("Reference for a former intern", "could you provide a reference for Tom Becker, who interned with you last summer?", True),
            ("Interview confirmation", "confirming I'll attend the second interview on Thursday at 2 pm.", False),
            ("Benefits enrolment closed", "automated: the benefits enrolment window for staff has now closed.", False),
        ],
    ),
}
# fmt: on

GREETINGS = ["Hi,", "Hello,", "Dear team,", "Good morning,", "Hi there,", "", "Hello team,"]
CONTEXTS = [
    "",
    "",
    " We're a 200-person logistics company.",
    " I'm writing on behalf of our IT manager.",
    " This is for our Madrid office.",
    " Sorry for the long email.",
    " Our account is ACME-2291.",
]
CLOSERS = ["Thanks,\nAlex", "Best regards,\nJ. Smith", "Cheers,\nSam", "Kind regards,\nPriya",
           "Regards,\nthe ops team", "", "Thank you!\nLena"]  # fmt: skip
SUBJECT_PREFIXES = ["", "", "Re: ", "Fwd: ", "Question: ", ""]


def render(situation: Situation, rng: random.Random) -> dict[str, str | bool]:
    subject, body, needs_reply = situation
    text = body[0].upper() + body[1:]
    greeting, closer = rng.choice(GREETINGS), rng.choice(CLOSERS)
    parts = [greeting, (text + rng.choice(CONTEXTS)).strip(), closer]
    return {
        "subject": rng.choice(SUBJECT_PREFIXES) + subject,
        "body": "\n\n".join(p for p in parts if p),
        "needs_reply": needs_reply,
    }


def main() -> None:
    rng = random.Random(20261202)
    here = Path(__file__).parent
    train: list[dict[str, str | bool]] = []
    dev: list[dict[str, str | bool]] = []
    for department, (train_situations, dev_situations) in SITUATIONS.items():
        for situation in train_situations:  # 15 situations x 2 tellings = 30 rows
            train += [{**render(situation, rng), "department": department} for _ in range(2)]
        for number, situation in enumerate(dev_situations):  # 8 x 2 = 16 rows
            group = f"{department}-{number}"
            dev += [{**render(situation, rng), "department": department, "group": group}
                    for _ in range(2)]  # fmt: skip
    rng.shuffle(train)
    rng.shuffle(dev)
    for name, rows in (("train", train), ("dev", dev)):
        with (here / f"{name}.jsonl").open("w") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(train)} train and {len(dev)} dev emails")


if __name__ == "__main__":
    main()
