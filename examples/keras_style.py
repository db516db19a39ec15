"""The classic Keras distillation example, in PyTorch with kdistill.

Trains a teacher, then distils it into a small student with ``Distiller``, exactly the
calls of the Keras example (``compile(optimizer, metrics, student_loss_fn,
distillation_loss_fn, alpha, temperature)``, ``fit``, ``evaluate``). Uses 10,000
Fashion-MNIST training images so it runs in about two minutes on 2 CPU cores.

    python examples/keras_style.py
"""

import torch
from torch import nn

from kdistill import Distiller, KLDivergence, Trainer, build_model, load_dataset, seed_everything

seed_everything(0)
data = load_dataset("fashion_mnist")  # Debian: apt-get install dataset-fashion-mnist
x_train, y_train = data.x_train[:10_000], data.y_train[:10_000]
x_test, y_test = data.x_test, data.y_test

# Train the teacher (Trainer is the same loop as keras.Model.fit).
teacher = build_model("classic_teacher")
Trainer(teacher).compile("adam", metrics=["accuracy"]).fit(x_train, y_train, epochs=1, batch_size=64)

# Distil it into the student.
student = build_model("classic_student")
distiller = Distiller(student=student, teacher=teacher)
distiller.compile(
    optimizer=torch.optim.Adam(student.parameters()),
    metrics=["accuracy"],
    student_loss_fn=nn.CrossEntropyLoss(),
    distillation_loss_fn=KLDivergence(),  # receives softmax(logits / T) of student and teacher
    alpha=0.1,
    temperature=10,
)
distiller.fit(x_train, y_train, epochs=3, batch_size=64, validation_data=(x_test, y_test))
print(distiller.evaluate(x_test, y_test))
