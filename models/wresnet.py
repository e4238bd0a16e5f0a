"""A Wide-ResNet image classifier, after the vision model of Alpa's benchmark suite.

A stem (conv, batch norm, ReLU, 3x3/2 max pool), then stages of basic residual
blocks: two 3x3 convolutions, each after batch norm and ReLU (pre-activation),
added to the block's input (through a strided 1x1 convolution where the block
changes width or resolution). Stage ``s`` has ``base_width * width_factor * 2**s``
channels and halves the resolution, except the first. A last batch norm and ReLU,
a global average pool and a dense classifier give the logits; the loss is softmax
cross-entropy.

Layout is NHWC. Batch norm runs in training mode inside the step: it normalises
by the batch's statistics and updates its running averages (``nnx.BatchStat``,
``state.model_state``). Batches are ``{"image": f32 [B, H, W, C], "label": i32 [B]}``.
"""

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from autoshard.models.common import Batch, Setup, setup_model


@dataclasses.dataclass(frozen=True)
class WResNetConfig:
    """Sizes of the network. The default is the ImageNet setting of Alpa's suite
    (224x224 images, 1000 classes, width factor 2) on the ResNet-34 stage layout.

    Attributes:
      blocks: residual blocks per stage; its length is the number of stages.
      base_width: channels of the stem and, times ``width_factor``, of stage 0.
      width_factor: the width multiplier of every stage.
      num_classes: classes of the classifier.
      image_size: height and width of the input images.
      channels: channels of the input images.
      stem_kernel: kernel size of the stem convolution.
      stem_stride: stride of the stem convolution.
    """

    blocks: tuple[int, ...] = (3, 4, 6, 3)
    base_width: int = 64
    width_factor: int = 2
    num_classes: int = 1000
    image_size: int = 224
    channels: int = 3
    stem_kernel: int = 7
    stem_stride: int = 2

    def width(self, stage: int) -> int:
        """Channels of stage ``stage``."""
        return self.base_width * self.width_factor * 2**stage


def tiny() -> WResNetConfig:
    """A config small enough for CPU tests: 16x16 images, two stages of one block.

    Example:
      >>> cfg = tiny()
      >>> cfg.width(0), cfg.width(1)
      (8, 16)
    """
    return WResNetConfig(
        blocks=(1, 1),
        base_width=4,
        width_factor=2,
        num_classes=4,
        image_size=16,
        channels=3,
        stem_kernel=3,
        stem_stride=1,
    )


def _conv(c_in: int, c_out: int, kernel: int, stride: int, rngs: nnx.Rngs) -> nnx.Conv:
    return nnx.Conv(
        c_in, c_out, (kernel, kernel), strides=stride, padding="SAME", use_bias=False, rngs=rngs
    )


class Block(nnx.Module):
    """Pre-activation basic block: ``x + conv2(relu(bn2(conv1(relu(bn1(x))))))``."""

    def __init__(self, c_in: int, c_out: int, stride: int, rngs: nnx.Rngs):
        self.bn1 = nnx.BatchNorm(c_in, rngs=rngs)
        self.conv1 = _conv(c_in, c_out, 3, stride, rngs)
        self.bn2 = nnx.BatchNorm(c_out, rngs=rngs)
        self.conv2 = _conv(c_out, c_out, 3, 1, rngs)
        changes = stride != 1 or c_in != c_out
        self.shortcut = _conv(c_in, c_out, 1, stride, rngs) if changes else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.relu(self.bn1(x))
        # A projection shortcut reads the normalised input, as in pre-activation ResNets.
        skip = x if self.shortcut is None else self.shortcut(h)
        h = self.conv1(h)
        h = self.conv2(jax.nn.relu(self.bn2(h)))
        return skip + h


class WideResNet(nnx.Module):
    """Images ``[B, H, W, channels]`` to logits ``[B, num_classes]``.

    Example:
      >>> model = WideResNet(tiny(), nnx.Rngs(0))
      >>> model(jnp.zeros((2, 16, 16, 3))).shape
      (2, 4)
    """

    def __init__(self, config: WResNetConfig, rngs: nnx.Rngs):
        c = config.base_width
        self.stem = _conv(config.channels, c, config.stem_kernel, config.stem_stride, rngs)
        self.stem_bn = nnx.BatchNorm(c, rngs=rngs)
        blocks = []
        for stage, n in enumerate(config.blocks):
            width = config.width(stage)
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(Block(c, width, stride, rngs))
                c = width
        self.blocks = nnx.List(blocks)
        self.final_bn = nnx.BatchNorm(c, rngs=rngs)
        self.head = nnx.Linear(c, config.num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.relu(self.stem_bn(self.stem(x)))
        x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        for block in self.blocks:
            x = block(x)
        x = jax.nn.relu(self.final_bn(x))
        return self.head(x.mean(axis=(1, 2)))


def loss_fn(model: WideResNet, batch: Batch) -> jax.Array:
    """Mean softmax cross-entropy of ``model(batch["image"])`` against ``batch["label"]``.

    Example:
      >>> cfg = tiny()
      >>> loss_fn(WideResNet(cfg, nnx.Rngs(0)), synthetic_batch(cfg, 2, jax.random.key(0))).shape
      ()
    """
    logits = model(batch["image"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()


def synthetic_batch(config: WResNetConfig, batch_size: int, key: jax.Array) -> Batch:
    """Noisy images of ``num_classes`` fixed random templates, labelled by template.

    The templates depend only on the config, so the label is a learnable function
    of the image and the loss falls within a few steps.

    Returns:
      ``{"image": f32 [batch_size, H, W, channels], "label": i32 [batch_size]}``.

    Example:
      >>> b = synthetic_batch(tiny(), 2, jax.random.key(0))
      >>> b["image"].shape, b["label"].dtype
      ((2, 16, 16, 3), dtype('int32'))
    """
    size = (config.image_size, config.image_size, config.channels)
    templates = jax.random.normal(jax.random.key(12345), (config.num_classes, *size))
    label_key, noise_key = jax.random.split(key)
    label = jax.random.randint(label_key, (batch_size,), 0, config.num_classes, jnp.int32)
    noise = jax.random.normal(noise_key, (batch_size, *size))
    return {"image": templates[label] + 0.5 * noise, "label": label}


def setup(
    config: WResNetConfig,
    batch_size: int,
    seed: int = 0,
    learning_rate: float = 1e-3,
    tx: optax.GradientTransformation | None = None,
) -> Setup:
    """A WideResNet, its adamw train step, initial state and one synthetic batch.

    The state's ``model_state`` holds the batch-norm running statistics.

    Example:
      >>> s = setup(tiny(), batch_size=2)
      >>> state, metrics = jax.eval_shape(s.train_step, s.state, s.batch)  # or jax.jit
      >>> state.model_state["stem_bn"]["mean"].shape, metrics["loss"].shape
      ((4,), ())
    """
    return setup_model(
        WideResNet, loss_fn, synthetic_batch, config, batch_size, seed, learning_rate, tx
    )
