"""LMCache's worker protocol, served by kvbus: unmodified LMCache engines register, report and take commands."""
