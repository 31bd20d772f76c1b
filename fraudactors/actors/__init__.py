"""The actor runtime: bounded mailboxes, supervisors, and a process pool for CPU work."""

from fraudactors.actors.actor import actor_child, last_step
from fraudactors.actors.mailbox import Mailbox, Request, ask
from fraudactors.actors.pool import PoolBroken, ProcessPool, RemoteCallError, WorkerInitError
from fraudactors.actors.supervisor import ChildSpec, Restart, Strategy, Supervisor, run_root
from fraudactors.actors.taskstatus import IGNORED, TaskStatus, start_task

__all__ = [
    "IGNORED",
    "ChildSpec",
    "Mailbox",
    "PoolBroken",
    "ProcessPool",
    "RemoteCallError",
    "Request",
    "Restart",
    "Strategy",
    "Supervisor",
    "TaskStatus",
    "WorkerInitError",
    "actor_child",
    "ask",
    "last_step",
    "run_root",
    "start_task",
]
