"""The sweep driver's live objects (its Tune callbacks), by name.

Tune restores a resumed experiment's callbacks from its own pickle (`tuner.pkl`, written
by the run that started the experiment), so a plain callback would come back with the
first run's settings and without this process's signal handlers and bookkeeping. Our
callbacks pickle as a reference to the object of the same name registered by the sweep
running now: a resumed sweep runs with this run's callbacks.
"""

from __future__ import annotations

from typing import Any

from ray import tune

_objects: dict[str, Any] = {}


def register(name: str, obj: Any) -> Any:
    _objects[name] = obj
    return obj


def get(name: str) -> Any:
    if name not in _objects:
        raise RuntimeError(f"no live {name!r}: only a running sweep driver has its callbacks")
    return _objects[name]


def clear() -> None:
    _objects.clear()


class LiveCallback(tune.Callback):
    """A Tune callback that unpickles as the live object registered under `live_name`."""

    live_name = ""

    def __reduce__(self) -> tuple:
        return get, (self.live_name,)
