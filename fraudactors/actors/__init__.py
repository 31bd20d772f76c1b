"""The actor runtime: bounded mailboxes, supervisors, and a process pool for CPU work."""

from fraudactors.actors.mailbox import Mailbox, Request, ask
from fraudactors.actors.taskstatus import IGNORED, TaskStatus

__all__ = ["IGNORED", "Mailbox", "Request", "TaskStatus", "ask"]
