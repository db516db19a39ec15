"""Distil from an offline teacher cache, with augmentation: the teacher runs once (over 4
seeded augmented views of every sample), then every epoch costs a plain student step.

    python examples/cached_teacher.py                                  # needs scikit-learn
    torchrun --nproc-per-node 2 examples/cached_teacher.py             # the same, on 2 processes

Epoch e trains on view e mod 4; the student sees exactly the inputs the teacher saw.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kdistill import Distiller, Trainer, build_model, distributed, load_dataset
from kdistill.data.augment import Compose, GaussianNoise, RandomCrop
from kdistill.teacher import TeacherCache

CACHE = Path("runs/example_cache/teacher")


def main() -> None:
    # 1. data and a trained teacher (the 8x8 digits: seconds)
    data = load_dataset("digits")
    torch.manual_seed(0)
    teacher = build_model("mlp", hidden=[256], input_size=8)
    Trainer(teacher).compile("adam", metrics=["accuracy"]).fit(data.x_train, data.y_train, epochs=5, verbose=0, seed=0)

    # 2. the cache: 4 augmented views per sample, each from a stored per-sample seed
    augment = Compose([RandomCrop(1), GaussianNoise(0.05)])
    cache = TeacherCache.build(teacher, data.x_train, CACHE, views=4, augment=augment, overwrite=True)
    if distributed.is_main():
        info = cache.describe()
        print(f"cache: {info['num_samples']} samples x {info['views']} views, {info['bytes_per_sample']} bytes/sample")

    # 3. distil from it: no teacher forward; fit(augment=...) may be left out (the cache replays its views)
    torch.manual_seed(1)
    student = build_model("mlp", hidden=[16], input_size=8)
    distiller = Distiller(student=student, teacher=cache)
    distiller.compile(torch.optim.Adam(student.parameters(), lr=3e-3), metrics=["accuracy"], alpha=0.3, temperature=4)
    history = distiller.fit(data.x_train, data.y_train, epochs=12, batch_size=32, seed=0, verbose=0,
                            validation_data=(data.x_test, data.y_test))
    if distributed.is_main():
        print(f"final test accuracy {history.history['val_accuracy'][-1]:.4f}")


if __name__ == "__main__":
    main()
