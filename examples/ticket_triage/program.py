"""Ticket triage: route an IT support ticket to the queue that handles it."""

from typing import Literal

import dspy

Category = Literal["network", "hardware", "software", "access", "security", "billing"]


class TicketTriage(dspy.Signature):
    """Route an IT support ticket to the team that should handle it."""

    ticket: str = dspy.InputField(desc="the ticket as the user wrote it")
    category: Category = dspy.OutputField(
        desc=(
            "network: connectivity, Wi-Fi, VPN, DNS; "
            "hardware: physical devices (laptops, monitors, printer mechanics, batteries, docks); "
            "software: application or OS errors, installs, updates, crashes; "
            "access: passwords, accounts, permissions, MFA, lockouts; "
            "security: phishing, malware, suspicious activity, lost or stolen devices; "
            "billing: invoices, charges, subscriptions, refunds"
        )
    )


def build() -> dspy.Module:
    return dspy.Predict(TicketTriage)
