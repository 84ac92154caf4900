"""The first line of every trial actor's log; torch-free, for the Tune trial's process."""

from __future__ import annotations


def actor_banner(run: str, role: str, d_model: int, num_heads: int, lr: float) -> str:
    """The first line of a trial's actor logs (dashboard: Actors -> Log), naming the trial
    (in a sweep the Train run is named after it), its config and the actor's role.

    Ray shows only the class name of the actors Train creates (RayTrainWorker,
    TrainController) and a function trainable's name for Tune's, the same for every
    trial: this line is what tells them apart. Ray also forwards it to the driver's
    console, prefixed with the actor's class and pid."""
    return (f"[hlbd] trial {run}: d_model {d_model}, num_heads {num_heads}, lr {lr:.2e}; "
            f"{role}")

