"""Refused: what a request asks for cannot be done here, through no failure of the agent.

An unknown compression method, an operation the backend lacks, a location this worker does not
have: the command is answered REFUSED, with the reason, and nothing was done. Any other exception
from a command is the agent's failure and is answered ERROR.
"""

from __future__ import annotations


class Refused(Exception):
    """The request is the client's mistake; the message says what it asked that cannot be done."""
