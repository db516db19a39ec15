"""Use kdistill's loss in your own training loop: the pure function ``kd_loss``.

    python examples/own_loop.py
"""

import torch
import torch.nn.functional as F

from kdistill import build_model, kd_loss, load_dataset, seed_everything

seed_everything(0)
data = load_dataset("digits")  # scikit-learn's 8x8 digits: pip install kdistill[digits]
x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
teacher = build_model("mlp", hidden=(256, 256), input_size=8)
student = build_model("mlp", hidden=(32,), input_size=8)

# 1. train the teacher
opt = torch.optim.Adam(teacher.parameters(), lr=1e-3)
for epoch in range(30):
    for i in range(0, len(x), 64):
        loss = F.cross_entropy(teacher(x[i : i + 64]), y[i : i + 64])
        opt.zero_grad(), loss.backward(), opt.step()
teacher.eval().requires_grad_(False)

# 2. distil: alpha * CE + (1 - alpha) * T^2 KL(p_teacher || p_student)
opt = torch.optim.Adam(student.parameters(), lr=1e-3)
alpha, temperature = 0.1, 4.0
for epoch in range(30):
    for i in range(0, len(x), 64):
        xb, yb = x[i : i + 64], y[i : i + 64]
        with torch.inference_mode():
            teacher_logits = teacher(xb)
        student_logits = student(xb)
        loss = alpha * F.cross_entropy(student_logits, yb) + (1 - alpha) * kd_loss(
            student_logits, teacher_logits.clone(), temperature
        )
        opt.zero_grad(), loss.backward(), opt.step()

xt, yt = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)
for name, model in (("teacher", teacher), ("student", student)):
    print(name, f"{(model(xt).argmax(1) == yt).float().mean():.3f}")
