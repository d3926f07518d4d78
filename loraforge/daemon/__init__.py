"""The build daemon: watch recipes and data, queue jobs in SQLite, run them one per GPU, survive restarts."""

from loraforge.daemon.daemon import Daemon, default_recipe_cmd
from loraforge.daemon.queue import FINISHED_STATES, JOB_STATES, Job, JobNotFound, JobQueue
from loraforge.daemon.status import read_status

__all__ = ["Daemon", "FINISHED_STATES", "JOB_STATES", "Job", "JobNotFound", "JobQueue", "default_recipe_cmd",
           "read_status"]
