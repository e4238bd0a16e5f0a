"""Pure optax train steps for Flax NNX models.

A model is split once into a static ``graphdef`` and its ``nnx.Param`` state;
the train step is then a pure function of ``(TrainState, batch)`` that
``jax.make_jaxpr`` and ``jax.jit`` accept. ``nnx.Optimizer`` is not used: it
updates its state in place, which a pure function of ``(state, batch)`` cannot do.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

Batch = dict[str, jax.Array]
LossFn = Callable[[nnx.Module, Batch], jax.Array]
TrainStep = Callable[["TrainState", Batch], tuple["TrainState", dict[str, jax.Array]]]


class TrainState(NamedTuple):
    """Everything a train step reads and writes.

    Attributes:
      params: ``nnx.State`` holding the model's ``nnx.Param`` variables.
      opt_state: the optax state for ``params``.
      step: int32 scalar, number of steps taken.
      model_state: ``nnx.State`` of the model's ``nnx.BatchStat`` variables
        (batch-norm running statistics), updated by the forward pass; ``None``
        for models without any.
    """

    params: nnx.State
    opt_state: optax.OptState
    step: jax.Array
    model_state: nnx.State | None = None


class Setup(NamedTuple):
    """A ready-to-run reference problem: step function, initial state, one batch."""

    train_step: TrainStep
    state: TrainState
    batch: Batch
    config: Any


def init_state(
    model: nnx.Module, tx: optax.GradientTransformation
) -> tuple[nnx.GraphDef, TrainState]:
    """Splits ``model`` into its graphdef and an initial ``TrainState``.

    The model may hold ``nnx.Param`` and ``nnx.BatchStat`` variables (the
    latter become ``state.model_state``). Anything else (dropout ``Rngs``,
    caches) would be silently frozen into the step, so it is rejected.

    Args:
      model: a constructed NNX module.
      tx: the optax optimizer.

    Returns:
      ``(graphdef, state)`` with ``state.step == 0``.

    Example:
      >>> import optax
      >>> from flax import nnx
      >>> graphdef, state = init_state(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), optax.sgd(0.1))
      >>> int(state.step), state.params["kernel"].shape
      (0, (2, 3))
    """
    graphdef, params, stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    if jax.tree.leaves(rest):
        raise ValueError(
            f"model holds state other than nnx.Param and nnx.BatchStat, which the step "
            f"cannot update: {rest}"
        )
    model_state = stats if jax.tree.leaves(stats) else None
    return graphdef, TrainState(params, tx.init(params), jnp.zeros((), jnp.int32), model_state)


def make_train_step(
    graphdef: nnx.GraphDef, tx: optax.GradientTransformation, loss_fn: LossFn
) -> TrainStep:
    """Builds a pure train step ``(state, batch) -> (new_state, {"loss": loss})``.

    Args:
      graphdef: from :func:`init_state`.
      tx: the optax optimizer the state was initialised with.
      loss_fn: ``loss_fn(model, batch) -> scalar``.

    Returns:
      A function that ``jax.jit`` and ``jax.make_jaxpr`` accept.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from flax import nnx
      >>> tx = optax.sgd(0.1)
      >>> graphdef, state = init_state(nnx.Linear(2, 1, rngs=nnx.Rngs(0)), tx)
      >>> loss_fn = lambda m, b: jnp.mean((m(b["x"]) - b["y"]) ** 2)
      >>> step = jax.jit(make_train_step(graphdef, tx, loss_fn))
      >>> state, metrics = step(state, {"x": jnp.ones((4, 2)), "y": jnp.zeros((4, 1))})
      >>> int(state.step), metrics["loss"].shape
      (1, ())
    """

    def params_loss(params: nnx.State, model_state: nnx.State | None, batch: Batch):
        if model_state is None:
            return loss_fn(nnx.merge(graphdef, params), batch), None
        # copy: BatchNorm updates its stats in place, only on Variables of this trace.
        model = nnx.merge(graphdef, params, model_state, copy=True)
        loss = loss_fn(model, batch)
        return loss, nnx.state(model, nnx.BatchStat)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        (loss, model_state), grads = jax.value_and_grad(params_loss, has_aux=True)(
            state.params, state.model_state, batch
        )
        return apply_gradients(state, grads, tx, model_state), {"loss": loss}

    return train_step


def apply_gradients(
    state: TrainState, grads, tx: optax.GradientTransformation, model_state=None
) -> TrainState:
    """One optimizer update of ``state`` by ``grads``; the step counter advances.

    Example:
      >>> import optax
      >>> s = TrainState({"w": jnp.ones(2)}, optax.sgd(0.5).init({"w": jnp.ones(2)}),
      ...                jnp.zeros((), jnp.int32))
      >>> new = apply_gradients(s, {"w": jnp.ones(2)}, optax.sgd(0.5))
      >>> new.params["w"].tolist(), int(new.step)
      ([0.5, 0.5], 1)
    """
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(params, opt_state, state.step + 1, model_state)


def make_setup(
    model: nnx.Module,
    loss_fn: LossFn,
    batch: Batch,
    config: Any,
    learning_rate: float,
    tx: optax.GradientTransformation | None = None,
) -> Setup:
    """Packs a model and batch into a :class:`Setup` trained with ``tx`` (default
    ``optax.adamw(learning_rate)``).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> loss_fn = lambda m, b: jnp.mean(m(b["x"]) ** 2)
      >>> s = make_setup(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), loss_fn,
      ...                {"x": jnp.ones((3, 2))}, None, 1e-3)
      >>> sorted(s.batch)
      ['x']
    """
    tx = optax.adamw(learning_rate) if tx is None else tx
    graphdef, state = init_state(model, tx)
    return Setup(make_train_step(graphdef, tx, loss_fn), state, batch, config)


def setup_model(
    model_cls: Callable[[Any, nnx.Rngs], nnx.Module],
    loss_fn: LossFn,
    synthetic_batch: Callable[[Any, int, jax.Array], Batch],
    config: Any,
    batch_size: int,
    seed: int = 0,
    learning_rate: float = 1e-3,
    tx: optax.GradientTransformation | None = None,
) -> Setup:
    """The reference models' ``setup``: ``model_cls(config, rngs)`` initialised from
    ``seed``, one ``synthetic_batch``, and the train step (``tx``, default adamw).

    Example:
      >>> batch = lambda cfg, n, key: {"x": jax.random.normal(key, (n, cfg))}
      >>> loss_fn = lambda m, b: jnp.mean(m(b["x"]) ** 2)
      >>> s = setup_model(lambda d, rngs: nnx.Linear(d, d, rngs=rngs), loss_fn, batch, 3, 4)
      >>> s.batch["x"].shape, s.state.params["kernel"].shape
      ((4, 3), (3, 3))
    """
    model_key, data_key = jax.random.split(jax.random.key(seed))
    model = model_cls(config, nnx.Rngs(params=model_key))
    batch = synthetic_batch(config, batch_size, data_key)
    return make_setup(model, loss_fn, batch, config, learning_rate, tx)


def abstract_setup(setup: Callable[..., Setup], *args, **kwargs) -> Setup:
    """``setup(*args, **kwargs)`` with its state and batch as ``jax.ShapeDtypeStruct``s:
    nothing is initialised or placed on a device, so real-size models plan and
    compile (``.lower(...).compile()``) in seconds.

    Example:
      >>> from autoshard.models import mlp
      >>> s = abstract_setup(mlp.setup, mlp.tiny(), 4)
      >>> isinstance(s.batch["x"], jax.ShapeDtypeStruct)
      True
    """
    made = {}

    def build():
        s = setup(*args, **kwargs)
        made["setup"] = s
        return s.state, s.batch

    state, batch = jax.eval_shape(build)
    s = made["setup"]
    return Setup(s.train_step, state, batch, s.config)
