"""A fit that survives being killed: TrainingCheckpoint + fit(resume_from=...).

Run it, press Ctrl-C (or kill it) during training, and run it again: it continues from the
last saved step and ends with the same weights as a run that was never interrupted.

    python examples/resumable_fit.py        # needs scikit-learn (the 8x8 digits)
"""

from __future__ import annotations

from pathlib import Path

import torch

from kdistill import Distiller, Trainer, build_model, load_dataset
from kdistill.callbacks import TrainingCheckpoint

STATE = Path("runs/example_resumable/last.pt")


def main() -> None:
    # 1. data and models (the same seed gives the same initial weights on every start)
    data = load_dataset("digits")
    torch.manual_seed(0)
    teacher = build_model("mlp", hidden=[256], input_size=8)
    Trainer(teacher).compile("adam", metrics=["accuracy"]).fit(data.x_train, data.y_train, epochs=5, verbose=0, seed=0)
    torch.manual_seed(1)
    student = build_model("mlp", hidden=[16], input_size=8)

    # 2. distil, saving a resumable state every 5 steps and at each epoch end
    distiller = Distiller(student=student, teacher=teacher)
    distiller.compile(torch.optim.Adam(student.parameters(), lr=3e-3), metrics=["accuracy"], alpha=0.3, temperature=4)
    history = distiller.fit(
        data.x_train, data.y_train, epochs=20, batch_size=32, seed=0, verbose=2,
        validation_data=(data.x_test, data.y_test),
        callbacks=[TrainingCheckpoint(STATE, every_steps=5)],
        resume_from=STATE if STATE.is_file() else None,  # continue where a killed run stopped
    )
    print(f"final test accuracy {history.history['val_accuracy'][-1]:.4f}; state in {STATE}")


if __name__ == "__main__":
    main()
