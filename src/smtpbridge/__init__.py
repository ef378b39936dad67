"""smtpbridge: an SMTP submission bridge for devices that still speak 2005's SMTP."""

__version__ = "0.1.0"
