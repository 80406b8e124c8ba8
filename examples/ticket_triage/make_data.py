"""Writes train.jsonl and dev.jsonl for the ticket-triage example (run once; output committed).

Each ticket is one hand-written problem statement, told in one of several voices (terse,
chatty, formal, frustrated, a forwarded note) with optional context and sign-off. Dev tickets
use problem statements that never appear in train, so dev measures generalisation, not recall.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

PROBLEMS: dict[str, list[str]] = {
    "network": [
        "the VPN disconnects every few minutes when I work from home",
        "Wi-Fi in the 3rd floor meeting rooms keeps dropping",
        "I can't resolve any internal hostnames, looks like DNS is broken",
        "our branch office has no internet since this morning",
        "the guest wireless network doesn't show up on my phone",
        "pinging the file server times out from my desk",
        "ethernet port at desk 14B seems dead, no link light",
        "VPN client says 'gateway unreachable' when I try to connect",
        "the network is extremely slow, web pages take a minute to load",
        "I keep getting a self-assigned 169.254 IP address",
        "can't reach the intranet site but google works fine",
        "the office Wi-Fi password doesn't work after the change on Monday",
        "video calls keep freezing and the connection drops in the warehouse",
        "site-to-site tunnel to the Lyon office is down",
        "packet loss on the link to the data centre, about 20 percent",
        "my laptop connects to Wi-Fi but says 'no internet'",
        "the proxy blocks every page with a connection reset error",
        "DNS lookups for our customer portal return the wrong address",
        "the switch in the server room is flashing amber and half the floor is offline",
        "remote desktop to my workstation fails because the host can't be reached over VPN",
        "wireless signal is extremely weak in the east wing",
        "DHCP seems to be out of addresses, new devices can't get an IP",
        "latency to the cloud servers jumped to 800ms",
        "split tunnelling on the VPN stopped working, all traffic goes through the office",
        "the shop floor scanners lost their network connection",
        "after the router firmware update nobody can get online",
        "can't connect to the SFTP server, connection refused on port 22",
        "the access point near reception keeps rebooting",
        "my home office connection works but the corporate VPN is painfully slow",
        "internal websites load but file shares time out",
        "the conference room Wi-Fi kicks everyone off at 2pm every day",
        "traceroute to the ERP server dies at the second hop",
        "IPv6 seems broken, some sites never load",
        "new hire's laptop can't join the corporate wireless network, certificate prompt loops",
        "we lost connectivity between the two buildings after the storm",
        "the mobile hotspot on my work phone doesn't give internet to my laptop",
        "the firewall is dropping connections to our payment gateway",
        "network printer can't be reached by anyone on VLAN 30",
        "VPN connects but I can't reach any internal IP addresses",
        "the captive portal for the visitor network never loads",
        "my connection drops whenever the microwave in the kitchen is on",
        "internet bandwidth is saturated, uploads crawl",
    ],
    "hardware": [
        "my laptop battery drains from full to zero in under an hour",
        "the external monitor flickers and goes black",
        "the printer on floor 2 has a paper jam that won't clear, a roller looks broken",
        "my keyboard has several keys that stopped working",
        "the docking station doesn't charge my laptop anymore",
        "laptop fan is making a loud grinding noise",
        "my screen has a crack after the laptop fell",
        "mouse cursor jumps around, the trackpad seems faulty",
        "the projector in boardroom A shows no image",
        "my desk phone handset has no dial tone and the cord is frayed",
        "laptop won't power on at all, no lights",
        "the webcam shows only a black image",
        "the USB-C ports on my laptop are loose and disconnect",
        "headset microphone crackles, the cable looks damaged",
        "the hard drive is clicking and the laptop is very slow to boot",
        "the laptop overheats and shuts down when I run anything",
        "printer toner cartridge is leaking powder everywhere",
        "the badge reader at the back door is physically broken",
        "my second monitor isn't detected when connected through the dock",
        "the scanner's glass is cracked",
        "a swollen battery is pushing up the trackpad on my MacBook",
        "the label printer in shipping prints faded lines",
        "the tablet's charging port is bent and won't charge",
        "I need a replacement power adapter, mine stopped working",
        "the large-format plotter makes a grinding noise and stops",
        "my laptop hinge snapped and the screen won't stay up",
        "the RAM seems bad, the memory diagnostic reports errors",
        "monitor has a line of dead pixels down the middle",
        "the wireless mouse eats batteries in two days",
        "the server in rack 3 has a failed power supply light",
        "my laptop speakers are crackling and distorted",
        "the fingerprint reader on my laptop doesn't respond",
        "conference room speakerphone has a broken button",
        "the printer's duplex unit is mechanically stuck",
        "the barcode scanner doesn't light up anymore",
        "new desktop arrived with a dented case and it won't POST",
        "the UPS under my desk is beeping constantly",
        "my laptop keyboard backlight stopped working",
        "one of the disks in the NAS shows a red failure light",
        "the receipt printer at the front desk has a broken paper cutter",
        "my laptop screen hinge cable seems damaged, display goes black when I tilt it",
        "the docking station's ethernet port is physically broken",
    ],
    "software": [
        "Excel crashes every time I open a file with macros",
        "Outlook is stuck on 'updating inbox' and never finishes",
        "the latest Windows update failed with error 0x80070002",
        "I need Adobe Acrobat Pro installed on my laptop",
        "Teams shows a blank white window after launching",
        "the ERP client throws a runtime error when I run the monthly report",
        "my laptop shows a blue screen after the driver update",
        "Chrome keeps freezing when I open more than a few tabs",
        "the accounting software won't start, says a DLL is missing",
        "can you install Python and VS Code on my workstation",
        "Word documents open as read-only for no reason",
        "the CRM app crashes on my phone after the update",
        "macOS update is stuck at 'about 5 minutes remaining' for hours",
        "the PDF export in our reporting tool produces empty files",
        "Zoom says my client version is no longer supported",
        "the antivirus agent uses 100 percent CPU all day",
        "SAP GUI hangs when I post an invoice",
        "my calendar in Outlook doesn't sync with my phone",
        "the design team needs Figma desktop deployed",
        "PowerPoint freezes when I insert a video",
        "the inventory system shows an 'unexpected exception' error page",
        "Windows Explorer restarts every time I open the downloads folder",
        "the nightly backup job fails with a script error",
        "OneDrive keeps saying there are sync conflicts",
        "an app update broke the keyboard shortcuts in our editor",
        "the timesheet web app shows a 500 error when I submit",
        "I need the Visio licence installed, the installer fails halfway",
        "Slack notifications stopped working after the update",
        "the database client crashes on startup with a Java error",
        "my laptop is stuck in an update reboot loop",
        "the label design software can't find the printer driver",
        "Excel formulas show as text instead of calculating",
        "the internal expense app won't install on Android",
        "Photoshop crashes when saving large files",
        "the browser extension for our password manager disappeared after an update",
        "Outlook search returns no results for anything older than a week",
        "the scheduled task that exports sales data stopped running",
        "Java update broke the legacy warehouse application",
        "the print dialog in our web app freezes the whole browser",
        "license server error when launching AutoCAD",
        "please uninstall the old version of Office, it conflicts with the new one",
        "the dashboard tool shows corrupted charts since version 4.2",
    ],
    "access": [
        "I forgot my password and I'm locked out of my account",
        "I need access to the finance shared drive",
        "my MFA app is on my old phone, I can't log in",
        "my account got locked after too many attempts",
        "please give the new intern read permissions on the marketing SharePoint",
        "I can't log into the HR portal, it says my account is disabled",
        "my password expired while I was on leave",
        "I need admin rights on my laptop to install a driver",
        "please create an account for our new hire starting Monday",
        "I'm getting 'access denied' on the project folder I used to open",
        "the authenticator codes are always rejected",
        "I need to be added to the sales distribution list",
        "please remove access for an employee who left on Friday",
        "I can't reset my password, the self-service portal doesn't send the email",
        "my SSO login loops back to the sign-in page",
        "I need permission to approve purchase orders in the ERP",
        "my username was changed after my marriage and now nothing works",
        "our contractor needs temporary access to the Git repository",
        "I lost my hardware token and need a new way to sign in",
        "the shared mailbox for support doesn't show up, I think I lack permissions",
        "I need VPN access enabled on my account",
        "grant me edit rights to the budget spreadsheet please",
        "I can log in but I can't see the admin menu I had yesterday",
        "please unlock the service account used by the reporting job",
        "the new manager needs access to her team's calendars",
        "I keep being asked to re-register MFA every login",
        "I'm not in the right security group to open the CAD files",
        "my temporary password doesn't work",
        "please set up single sign-on for me in the new CRM",
        "I need database read access for the analytics project",
        "my account shows 'user not found' in the timesheet system",
        "can you reset the PIN on my badge so I can log into the printer",
        "please revoke the ex-vendor's access to our SharePoint site",
        "I changed my phone number and can't receive the SMS codes",
        "the system says my password doesn't meet the policy but it does",
        "I need a guest account for a visiting auditor",
        "my access to the payroll module was removed by mistake",
        "I need to transfer ownership of files from a departed colleague",
        "please add me as an owner of the Teams channel",
        "login to the warehouse terminal says invalid credentials",
        "my account is locked every morning, something keeps trying an old password",
        "I was promoted and need the permissions of a team lead",
    ],
    "security": [
        "I received a suspicious email asking me to verify my bank details",
        "I clicked a link in a phishing email and entered my password",
        "my laptop was stolen from my car last night",
        "there's a pop-up saying my files are encrypted and asking for bitcoin",
        "someone logged into my account from another country",
        "I lost my work phone on the train",
        "antivirus found a trojan in my downloads folder",
        "a USB stick was left in the lobby and someone plugged it in",
        "a caller claiming to be IT asked for my password",
        "there are strange outgoing emails from my mailbox I didn't send",
        "my browser homepage changed and there are extensions I didn't install",
        "an invoice attachment from an unknown sender had a macro, I enabled it",
        "I see failed login alerts for the admin account at 3am",
        "someone tailgated through the secure door into the server room",
        "a colleague's account is sending gift card requests",
        "I think my computer has malware, the mouse moves on its own",
        "we found an unknown device plugged into the network closet",
        "the CEO got a wire transfer request that looks fake",
        "I accidentally emailed customer data to the wrong external address",
        "my laptop bag with the encrypted laptop was stolen at the airport",
        "files on the shared drive have been renamed with a strange extension",
        "a text message says my account is suspended and to click a link",
        "our website shows defaced content",
        "I got an MFA push notification I didn't request, several times",
        "a former employee still seems to be accessing our systems",
        "the firewall logs show scanning from an internal host",
        "there's a keylogger-like device between my keyboard and PC",
        "I downloaded a cracked tool and now the antivirus is screaming",
        "someone posted our VPN credentials on a forum",
        "I found sensitive documents in the public printer tray that aren't mine",
        "a vendor email with changed bank details looks like spoofing",
        "my tablet with patient data is missing from the ward",
        "a QR code poster in the canteen leads to a fake login page",
        "unknown admin accounts appeared in our domain",
        "ransomware note found on the accounting server",
        "a LinkedIn message asked me to open a 'job offer' document that ran something",
        "I suspect my password was leaked in a data breach",
        "our security camera footage shows someone photographing screens",
        "the EDR tool quarantined a PowerShell script on many machines",
        "I received a voicemail deepfake of my manager asking for codes",
        "lost badge and laptop together at a conference",
        "an email with our logo asks staff to log in to a lookalike domain",
    ],
    "billing": [
        "we were charged twice for our monthly subscription",
        "I need a copy of last month's invoice for the software licences",
        "please cancel the subscription for the unused seats",
        "our credit card on file expired, how do we update it",
        "the invoice shows 50 licences but we only have 30 users",
        "we'd like a refund for the add-on we never activated",
        "can we switch from monthly to annual billing",
        "the VAT number on our invoices is wrong",
        "I was billed for a premium plan I downgraded from last month",
        "why did our cloud hosting bill triple this month",
        "please send the invoice to accounts payable instead of me",
        "we need a quote for 20 more user licences",
        "the payment failed but our card has funds",
        "our purchase order number is missing from the invoice",
        "we were charged after cancelling our trial",
        "the mobile phone bill for my work line has roaming charges I didn't incur",
        "can you split the invoice between two cost centres",
        "we haven't received a credit note for the returned equipment",
        "the renewal price is higher than what we agreed in the contract",
        "please change the billing address to our new office",
        "I need a receipt for the conference software purchase for expenses",
        "the subscription renewed automatically and we want to stop it",
        "our account was suspended for non-payment but we paid last week",
        "we're being charged in dollars instead of euros",
        "there's a late fee on an invoice we paid on time",
        "please explain the 'usage overage' line item on the bill",
        "we need to transfer the licence billing to our parent company",
        "the printer lease invoice includes a machine we returned",
        "can we get an educational discount on the licences",
        "the refund for the cancelled order never reached our account",
        "who approves the invoice for the new laptops",
        "we were invoiced for support hours that weren't used",
        "the direct debit mandate needs to be updated with new bank details",
        "I need the pro-forma invoice to raise a purchase order",
        "our subscription tier changed without our consent and the price went up",
        "the telecom invoice has a duplicate line for the same circuit",
        "please issue a corrected invoice with our legal company name",
        "the storage add-on is billed but we deleted the data months ago",
        "how much would it cost to add the analytics module",
        "we need the annual statement of all charges for the audit",
        "charge on my corporate card from the app store I don't recognise as ours",
        "the licence true-up invoice seems wrong by about 4,000 euros",
    ],
}

# Composed problem statements widen the train set's vocabulary (apps, devices, services,
# symptoms) beyond the hand-written ones; they are used for training only.
COMPOSED: dict[str, tuple[list[str], list[str]]] = {
    "network": (
        ["the VPN", "the office Wi-Fi", "the guest network", "DNS", "the internet connection",
         "the link to the warehouse", "the wireless in the lab", "the site-to-site VPN",
         "the network in meeting room 4", "the ethernet at my desk", "the proxy", "the firewall"],
        ["keeps dropping every few minutes", "is down for the whole floor", "is painfully slow",
         "times out when I reach the file server", "won't let my laptop connect",
         "stopped resolving internal names", "has huge packet loss since this morning",
         "disconnects whenever I move between rooms", "shows connected but no internet"],
    ),
    "hardware": (
        ["my laptop", "the monitor on my desk", "the printer by the kitchen", "my docking station",
         "the keyboard", "my mouse", "the conference room projector", "my laptop battery",
         "the webcam", "the desk phone", "the barcode scanner", "my headset", "the tablet"],
        ["is physically broken after a fall", "won't power on at all", "has a cracked casing",
         "makes a grinding noise", "overheats and shuts off", "has a loose port",
         "stopped charging", "has a flickering screen", "jams and a part is snapped",
         "needs a replacement part"],
    ),
    "software": (
        ["Excel", "Outlook", "Teams", "the ERP client", "Chrome", "the CRM app", "Zoom",
         "the accounting software", "Word", "the reporting tool", "Photoshop", "SAP", "OneDrive"],
        ["crashes when I open it", "fails to install with an error code",
         "freezes after the latest update", "shows an unexpected exception error",
         "won't start since the patch", "needs to be installed on my new laptop",
         "throws a runtime error on export", "keeps asking to repair itself",
         "is stuck on the loading screen"],
    ),
    "access": (
        ["my account", "my password", "my MFA setup", "the finance share", "the HR portal",
         "the shared mailbox", "the project folder", "the Git repository", "my SSO login",
         "the payroll module", "the admin console", "the sales SharePoint"],
        ["is locked after too many attempts", "expired and I can't reset it",
         "says access denied", "needs permissions for a new hire", "rejects my credentials",
         "lost my permissions after the reorg", "needs to be granted to a contractor",
         "should be revoked for a leaver", "keeps asking me to re-register"],
    ),
    "security": (
        ["a phishing email", "a suspicious link I clicked", "ransomware on the file server",
         "malware on my laptop", "a stolen company laptop", "a lost work phone",
         "an unknown USB stick", "a spoofed invoice email", "strange logins on my account",
         "a fake login page", "a scam call asking for my password", "a trojan alert"],
        ["needs to be reported", "may have exposed my credentials", "was found this morning",
         "looks like an attack", "happened on the train", "was flagged by the antivirus",
         "targeted the finance team", "asked for gift cards", "came from a lookalike domain"],
    ),
    "billing": (
        ["our invoice", "the monthly subscription", "the licence renewal", "a refund",
         "the cloud hosting bill", "our credit card on file", "the VAT on the invoice",
         "the purchase order", "the annual plan", "a credit note", "the phone bill",
         "the support contract charge"],
        ["was charged twice", "shows the wrong amount", "needs to be cancelled",
         "has not arrived yet", "went up without notice", "needs a corrected copy",
         "was billed after we cancelled", "needs to change to another cost centre",
         "has a late fee we don't owe"],
    ),
}


def composed_problems(category: str, count: int, rng: random.Random) -> list[str]:
    subjects, symptoms = COMPOSED[category]
    pairs = [(a, b) for a in subjects for b in symptoms]
    rng.shuffle(pairs)
    return [f"{subject} {symptom}" for subject, symptom in pairs[:count]]


OPENERS = [
    "", "", "Hi, ", "Hello team, ", "Hi IT, ", "Good morning, ", "Hey, ", "Dear support, ",
    "URGENT: ", "Quick one: ", "Hi there — ", "FYI ",
]
CONTEXTS = [
    "", "", "", " This started yesterday.", " It happened right after lunch.",
    " I have a client presentation in an hour.", " Two other people on my team have the same problem.",
    " I already restarted twice.", " It worked fine last week.", " Not sure who else to ask.",
    " This is blocking the month-end close.", " I'm working remotely this week.",
    " Happy to jump on a call.", " Screenshots available if needed.",
]
CLOSERS = [
    "", "", "", " Thanks!", " Thanks in advance.", " Cheers,\nSam", " Regards, Priya (Finance)",
    " Please help asap.", " -- Tom, Warehouse", " Thank you, Marie", " Sent from my phone",
]
VOICES = ["plain", "plain", "terse", "frustrated", "formal", "forwarded", "question"]


def render(problem: str, rng: random.Random) -> str:
    voice = rng.choice(VOICES)
    if voice == "terse":
        text = problem.rstrip(".") + "."
        return text[0].upper() + text[1:]
    if voice == "frustrated":
        body = f"{problem[0].upper()}{problem[1:]} AGAIN. This is the third time this month!!"
    elif voice == "formal":
        body = f"I would like to report the following issue: {problem}. Kindly advise."
    elif voice == "forwarded":
        body = f"Forwarding from a colleague: \"{problem}\". Can someone look into it?"
    elif voice == "question":
        body = f"Could you help? {problem[0].upper()}{problem[1:]}."
    else:
        body = f"{problem[0].upper()}{problem[1:]}."
    opener = rng.choice(OPENERS)
    keep_case = opener.endswith(": ") or body.startswith(("I ", "I'")) or body[1:2].isupper()
    if opener:
        body = opener + body if keep_case else opener + body[0].lower() + body[1:]
    return (body + rng.choice(CONTEXTS) + rng.choice(CLOSERS)).strip()


def main() -> None:
    rng = random.Random(20261129)
    here = Path(__file__).parent
    train: list[dict[str, str]] = []
    dev: list[dict[str, str]] = []
    seen: set[str] = set()

    def unique(problem: str) -> str:
        for _ in range(50):
            text = render(problem, rng)
            if text not in seen:
                seen.add(text)
                return text
        raise RuntimeError(f"cannot vary {problem!r}")

    for category, problems in PROBLEMS.items():
        shuffled = problems[:]
        rng.shuffle(shuffled)
        dev_problems, train_problems = shuffled[:10], shuffled[10:]
        # 60 train tickets, each a different problem: ~32 hand-written + composed ones.
        train_problems += composed_problems(category, 60 - len(train_problems), rng)
        for problem in train_problems:
            train.append({"ticket": unique(problem), "category": category})
        # 20 dev tickets: 10 held-out hand-written problems, each told in two voices.
        for i in range(20):
            # `group` names the problem: its two tellings stay on one side of the
            # calibration/test split.
            problem = dev_problems[i % len(dev_problems)]
            group = f"{category}-{i % len(dev_problems)}"
            dev.append({"ticket": unique(problem), "category": category, "group": group})
    rng.shuffle(train)
    rng.shuffle(dev)
    for name, rows in (("train", train), ("dev", dev)):
        with (here / f"{name}.jsonl").open("w") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(train)} train and {len(dev)} dev tickets")


if __name__ == "__main__":
    main()
