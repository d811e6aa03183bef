"""Cron expressions the way Kubeflow Pipelines reads them.

KFP's API server and ScheduledWorkflow controller parse ``cron_schedule.cron``
with ``cron.Parse`` of github.com/robfig/cron v1.2.0 (kubeflow/pipelines
backend 2.4.1 to 2.15.0: ``backend/src/apiserver/server/api_converter.go``,
``backend/src/crd/controller/scheduledworkflow/util/cron_schedule.go``). Its
rules, which differ from a crontab in ways that silently run a schedule at the
wrong time:

- six fields, **seconds first**: ``sec min hour day-of-month month day-of-week``;
  robfig also takes five (day of week optional), so ``0 3 * * *`` is accepted
  and runs at minute 3 of *every* hour. Five fields are refused here, with the
  six-field expression the user meant.
- ``?`` means ``*`` in any field; names (JAN, SUN) are case-insensitive; day of
  week is 0-6 (no 7); ``N/step`` means ``N-max/step``; a range must not run
  backwards. No ``L``, ``W``, ``#`` or year field (croniter accepts those).
- descriptors: ``@yearly``, ``@annually``, ``@monthly``, ``@weekly``, ``@daily``,
  ``@midnight``, ``@hourly`` and ``@every <Go duration>``.
- times are in the controller's zone: UTC unless the cluster admin sets
  ``CRON_SCHEDULE_TIMEZONE`` on the scheduledworkflow controller.

croniter computes the next fire times (shown before a schedule is created);
the robfig-only rules above are checked first, because croniter is more
lenient (it wraps ``5-3`` around, takes ``L``/``W``/``#``, day 7 and years).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

from croniter import croniter
from croniter.croniter import CroniterError

FIELDS = ("seconds", "minutes", "hours", "day of month", "month", "day of week")
_BOUNDS = {
    "seconds": (0, 59),
    "minutes": (0, 59),
    "hours": (0, 23),
    "day of month": (1, 31),
    "month": (1, 12),
    "day of week": (0, 6),
}
_NAMES: Mapping[str, Mapping[str, int]] = {
    "month": {m: i for i, m in enumerate("jan feb mar apr may jun jul aug sep oct nov dec".split(), start=1)},
    "day of week": {d: i for i, d in enumerate("sun mon tue wed thu fri sat".split())},
}
_DESCRIPTORS = {
    "@yearly": "0 0 0 1 1 *",
    "@annually": "0 0 0 1 1 *",
    "@monthly": "0 0 0 1 * *",
    "@weekly": "0 0 0 * * 0",
    "@daily": "0 0 0 * * *",
    "@midnight": "0 0 0 * * *",
    "@hourly": "0 0 * * * *",
}
#: Go's time.ParseDuration: one or more <number><unit>, units ns us µs ms s m h.
_GO_DURATION = re.compile(r"^(\d+(\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)((\d+(\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h))*$")
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}


class CronError(ValueError):
    """The expression would be refused by KFP, or accepted with a meaning nobody intends."""


def validate_cron(expression: str) -> str:
    """Check a KFP cron expression; return it normalised to single spaces."""
    text = " ".join((expression or "").split())
    if text.startswith("@"):
        return _check_descriptor(text)
    fields = text.split(" ") if text else []
    if len(fields) == 5:
        raise CronError(
            f"cron: KFP reads 6 fields with seconds first; {expression!r} has 5 and would run at "
            f"second {fields[0]} of minute {fields[1]} every hour; did you mean {'0 ' + text!r}?"
        )
    if len(fields) != 6:
        raise CronError(
            f"cron: expected 6 space-separated fields ({' '.join(FIELDS)}) or a descriptor such as "
            f"@daily, got {len(fields)} in {expression!r}"
        )
    for value, name in zip(fields, FIELDS, strict=True):
        _check_field(value, name)
    next_runs(text, 1)  # croniter: anything it still cannot schedule (e.g. 31 February)
    return text


def next_runs(expression: str, count: int = 3, after: datetime | None = None) -> list[datetime]:
    """The next ``count`` fire times (UTC) of a validated expression."""
    after = after or datetime.now(UTC)
    text = " ".join(expression.split())
    if text.startswith("@every "):
        step = timedelta(seconds=_go_seconds(text.removeprefix("@every ")))
        return [after + step * (i + 1) for i in range(count)]
    cron = _DESCRIPTORS.get(text, text).replace("?", "*")  # robfig: '?' is '*' in any field
    try:
        it = croniter(cron, after, second_at_beginning=True)
        return [it.get_next(datetime) for _ in range(count)]
    except (CroniterError, ValueError) as err:
        raise CronError(f"cron: {expression!r} never fires or cannot be read: {err}") from None


def _check_descriptor(text: str) -> str:
    if text in _DESCRIPTORS:
        return text
    if text.startswith("@every "):
        duration = text.removeprefix("@every ")
        if not _GO_DURATION.match(duration) or _go_seconds(duration) < 1:
            raise CronError(f"cron: {text!r}: expected a duration of at least 1s such as 1h30m or 45m")
        return text
    raise CronError(
        f"cron: unknown descriptor {text!r}; KFP knows {', '.join(sorted(_DESCRIPTORS))} and @every <duration>"
    )


def _go_seconds(duration: str) -> float:
    return sum(float(n) * _GO_UNITS[u] for n, _, u in re.findall(r"(\d+(\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)", duration))


def _check_field(value: str, name: str) -> None:
    low, high = _BOUNDS[name]
    names = _NAMES.get(name, {})

    def bad(reason: str) -> CronError:
        return CronError(f"cron: {name} field {value!r}: {reason}")

    def number(token: str) -> int:
        if token.lower() in names:
            return names[token.lower()]
        if not token.isdigit():
            hint = f" or one of {', '.join(n.upper() for n in names)}" if names else ""
            raise bad(f"{token!r} is not a number{hint} (KFP has no L, W or # and no year field)")
        if not low <= int(token) <= high:
            raise bad(f"{token} is outside {low}-{high}")
        return int(token)

    for item in value.split(","):
        if not item:
            raise bad("empty list item")
        base, slash, step = item.partition("/")
        if slash and not (step.isdigit() and int(step) > 0):
            raise bad(f"step {step!r} must be a positive integer")
        if base in ("*", "?"):
            continue
        start, dash, end = base.partition("-")
        first = number(start)
        if dash and number(end) < first:
            raise bad(f"range {base} runs backwards (KFP refuses it; list both parts instead)")
