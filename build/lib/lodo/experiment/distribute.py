"""The ``distribute=`` config group: which ``tf.distribute`` strategy trains an image task.

Logical CPU devices (``num_cpu_devices``) and the multi-worker cluster must be
configured before TensorFlow starts its runtime, so ``make_strategy`` is the
first TensorFlow call of an image run.
"""

from __future__ import annotations

import tensorflow as tf


class DistributeError(ValueError):
    """A ``distribute=`` setting this machine cannot honour, as one actionable line."""


def _split_cpu(count) -> None:
    if count is None:
        return
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise DistributeError(f"distribute.num_cpu_devices must be a positive integer or null, got {count!r}")
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    wanted = [tf.config.LogicalDeviceConfiguration() for _ in range(count)]
    if current is not None and len(current) == count:
        return
    try:
        tf.config.set_logical_device_configuration(cpu, wanted)
    except RuntimeError:
        raise DistributeError(
            f"distribute.num_cpu_devices={count} comes too late: TensorFlow's runtime is already running in this "
            f"process (start a new process, e.g. `python -m lodo.run ...`)") from None


def configure_devices(cfg) -> None:
    """Split the CPU as ``cfg.num_cpu_devices`` says; call before anything starts TensorFlow's runtime."""
    _split_cpu(cfg.get("num_cpu_devices"))


def make_strategy(cfg) -> tf.distribute.Strategy:
    """The strategy that ``cfg`` (the ``distribute`` group) names."""
    name = cfg.get("name", "single")
    _split_cpu(cfg.get("num_cpu_devices"))
    if name == "single":
        return tf.distribute.get_strategy()  # the default strategy: one device, no replica machinery
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        if len(devices) < 2 and not gpus:
            raise DistributeError("distribute=mirrored found no GPU and a single CPU device: run on a machine with "
                                  "GPUs, or split the CPU with distribute.num_cpu_devices=2")
        return tf.distribute.MirroredStrategy(devices)
    if name == "multi_worker":
        resolver_name = cfg.get("cluster_resolver", "tf_config")
        if resolver_name == "slurm":
            resolver = tf.distribute.cluster_resolver.SlurmClusterResolver()
        elif resolver_name == "tf_config":
            resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        else:
            raise DistributeError(f"distribute.cluster_resolver must be tf_config or slurm, got {resolver_name!r}")
        return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
    raise DistributeError(f"unknown distribute {name!r}; valid: single, mirrored, multi_worker")


def describe(strategy: tf.distribute.Strategy) -> dict:
    """What the run folder records about the devices."""
    try:
        devices = list(strategy.extended.worker_devices)
    except RuntimeError:  # the default strategy: whatever device TensorFlow places ops on
        gpus = tf.config.list_logical_devices("GPU")
        devices = [(gpus or tf.config.list_logical_devices("CPU"))[0].name]
    return {"strategy": type(strategy).__name__, "replicas": strategy.num_replicas_in_sync, "devices": devices}
