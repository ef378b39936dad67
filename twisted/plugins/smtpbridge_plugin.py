"""Makes ``twistd smtpbridge`` available."""

from twisted.application.service import ServiceMaker

smtpbridge = ServiceMaker(
    "smtpbridge",
    "smtpbridge.tap",
    "SMTP submission bridge: legacy clients in, STARTTLS + AUTH submission out",
    "smtpbridge",
)
