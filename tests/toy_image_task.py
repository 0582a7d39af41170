"""A tiny image task for the trainer's tests: a linear softmax classifier on fixed random 4×4 images.

Fast enough for CI, and small enough that LODO (which preconditions every
parameter jointly) runs in milliseconds. Batches are stateless in (seed, step),
as the ImageTask contract requires.
"""

import keras
import numpy as np
import tensorflow as tf

from tasks.image_base import ImageTask


class ToyImageTask(ImageTask):
    name = "toy_image"
    steps = 20

    def __init__(self, batch_size=8, classes=3, test_size=None):
        self.batch_size, self.classes, self.test_size = batch_size, classes, test_size

    def load(self):
        rng = np.random.default_rng(0)
        self.images = rng.standard_normal((64, 4, 4, 1)).astype("float32")
        self.labels = (self.images.reshape(64, -1)[:, :3].argmax(-1) % self.classes).astype("int64")

    def build_model(self, seed):
        model = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Flatten(),
                                  keras.layers.Dense(self.classes, kernel_initializer=keras.initializers.RandomNormal(
                                      stddev=0.1, seed=seed))])
        return model

    def train_batch(self, seed, step):
        index = tf.random.stateless_uniform([self.batch_size], seed=tf.stack([tf.cast(seed, tf.int64), step]),
                                            maxval=64, dtype=tf.int64)
        return tf.gather(self.images, index), tf.gather(self.labels, index)

    def validation_data(self):
        return tf.data.Dataset.from_tensor_slices((self.images[:16], self.labels[:16])).batch(8)

    def evaluate(self, model):
        n = self.test_size or 64
        logits = model(self.images[:n], training=False)
        loss = keras.losses.sparse_categorical_crossentropy(self.labels[:n], logits, from_logits=True)
        accuracy = np.mean(np.argmax(logits, -1) == self.labels[:n])
        return {"test_loss": float(np.mean(loss)), "test_accuracy": float(accuracy), "test_images": n}
