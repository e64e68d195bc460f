"""Throughput and time-to-go of a training run, for its log lines and summaries."""

from __future__ import annotations


def format_duration(seconds: float) -> str:
    """``1d02h``, ``3h05m`` or ``4m07s``: the two largest units."""
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s"


class Throughput:
    """Step times for images/s and ETA, without the first step (tracing) and pauses
    (checkpoints, validation), which are not timed at all.

        throughput = Throughput(global_batch)
        throughput.add(seconds_of_one_step)
        throughput.images_per_second(); throughput.eta(remaining_steps)
        throughput.reset_interval()          # after each log line
    """

    def __init__(self, global_batch: int):
        self.global_batch = global_batch
        self.interval_steps = self.total_steps = 0
        self.interval_time = self.total_time = 0.0

    def add(self, seconds: float) -> None:
        self.interval_steps += 1
        self.interval_time += seconds
        self.total_steps += 1
        self.total_time += seconds

    def images_per_second(self, total: bool = False) -> float:
        """Over the steps since the last :meth:`reset_interval`, or since the start."""
        steps, seconds = ((self.total_steps, self.total_time) if total
                          else (self.interval_steps, self.interval_time))
        return steps * self.global_batch / seconds if seconds > 0 else 0.0

    def eta(self, remaining_steps: int) -> str:
        if not self.total_steps:
            return "?"
        return format_duration(remaining_steps * self.total_time / self.total_steps)

    def reset_interval(self) -> None:
        self.interval_steps, self.interval_time = 0, 0.0
