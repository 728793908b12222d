"""Training checkpoints: a small wrapper over orbax's ``CheckpointManager``.

Each checkpoint is one step directory holding two items: "state" (the train state pytree: params,
optimizer state and its step, saved with their shardings) and "data" (a JSON dict: the data
stream's position and anything else the loop needs to continue exactly). Saves are asynchronous and
atomic (orbax writes to a temporary directory and renames it when complete), so a run killed
mid-save leaves the previous checkpoints intact and no partial one that looks finished.

Retention: the last ``keep_last`` checkpoints plus the ``keep_best`` ones with the lowest
``best_metric`` (checkpoints saved with metrics).

`Checkpointer.restore_latest` walks the checkpoints from the newest down and skips, with a warning in the
log (stderr), any that fails to load (missing or corrupted files), so nothing is ever
half-loaded. (orbax's v1 API arrives with orbax 1.0; this wrapper is the one place to change then.)
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers as policies


class Checkpointer:
    """Saves and restores (state, data dict) pairs under ``directory``.

    Args:
      directory: checkpoint root (created if missing).
      keep_last: newest checkpoints kept.
      keep_best: best checkpoints (lowest ``metrics[best_metric]``) kept in addition; 0 = none.
      best_metric: the metric the best checkpoints are ranked by.
      async_save: save in a background thread (the call returns once arrays are copied off device).
    """

    def __init__(self, directory, *, keep_last: int = 3, keep_best: int = 1,
                 best_metric: str = "val_loss", async_save: bool = True):
        for name, value, low in (("keep_last", keep_last, 1), ("keep_best", keep_best, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        self.directory = Path(directory).expanduser().absolute()
        self.best_metric = best_metric
        keep = [policies.LatestN(n=keep_last)]
        if keep_best:
            keep.append(policies.BestN(get_metric_fn=lambda m: m[best_metric], reverse=True,
                                       n=keep_best, keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy(keep),
            enable_async_checkpointing=async_save, cleanup_tmp_directories=True, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "data"))

    def steps(self) -> list[int]:
        """Steps of the finished checkpoints, oldest first."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, state, data: dict, metrics: dict | None = None) -> None:
        """Starts saving ``state`` and ``data`` (JSON-able) as ``step``; ``metrics`` (floats) rank
        the checkpoint for keep-best when they hold ``best_metric``."""
        if metrics is not None and self.best_metric not in metrics:
            metrics = None
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data)),
            metrics=metrics, force=True)

    def restore_latest(self, abstract_state):
        """The newest checkpoint that loads completely, as (step, state, data), or None if none does.

        Args:
          abstract_state: pytree like the saved state whose leaves are ``jax.ShapeDtypeStruct``s
            with the target shardings (or arrays, whose shapes, dtypes and shardings are used).
        """
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        for step in reversed(self.steps()):
            try:
                restored = self._manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
                if not isinstance(restored.data, dict):
                    raise ValueError(f"data item is {type(restored.data).__name__}, not a dict")
            except Exception as error:  # noqa: BLE001 - any failure means: do not use this one
                logging.warning(f"Skipping checkpoint step {step} in {self.directory}: it failed to "
                                f"load ({type(error).__name__}: {str(error)[:300]}); trying an "
                                "older one.")
                continue
            return step, restored.state, restored.data
        return None

    def wait(self) -> None:
        """Blocks until the pending asynchronous save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.close()
