"""Distil one Hugging Face causal language model saved on this machine into another.

    python examples/distil_causal_lm.py TEACHER_DIR STUDENT_DIR TEXT_FILE [TEXT_FILE ...]

The two directories hold models saved with ``save_pretrained`` (the teacher's tokenizer
beside it; the student must use the same one). Nothing is downloaded. Without arguments
the script first makes a tiny random teacher and student and a text file, as a demo that
runs in seconds; the distilled student and the tokenizer are saved to ``distilled/``.
"""

import sys

from kdistill import Distiller
from kdistill.data.text import load_tokenizer, read_text
from kdistill.losses import GeneralizedJSDLoss
from kdistill.models.causal_lm import load_causal_lm


def main(teacher_dir: str, student_dir: str, *text_files: str) -> None:
    tokenizer = load_tokenizer(teacher_dir)
    teacher, student = load_causal_lm(teacher_dir), load_causal_lm(student_dir)
    train, held_out = read_text(list(text_files), tokenizer, block_size=64).split(0.1, seed=0)

    distiller = Distiller(student=student, teacher=teacher)
    distiller.compile(optimizer="adamw", learning_rate=1e-3, metrics=["accuracy"], alpha=0.5,
                      distillation_loss_fn=GeneralizedJSDLoss(beta=0.5, temperature=1.0))
    distiller.fit(train, epochs=1, batch_size=8, validation_data=held_out)
    print("held-out next-token loss:", round(distiller.evaluate(held_out)["loss"], 4))
    student.save_pretrained("distilled")
    tokenizer.save_pretrained("distilled")


def make_demo() -> list[str]:
    """A tiny random teacher and student (Llama-style) with a tokenizer trained on a text file."""
    import inspect
    from pathlib import Path

    import kdistill.distiller
    from kdistill.data.text import train_tokenizer
    from kdistill.models.causal_lm import causal_lm

    text = inspect.getsource(kdistill.distiller)  # some local text: kdistill's own source
    Path("demo.txt").write_text(text, encoding="utf-8")
    tokenizer = train_tokenizer([text], vocab_size=512)
    shape = dict(intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    for folder, width, layers in (("demo_teacher", 64, 2), ("demo_student", 32, 1)):
        causal_lm("llama", vocab_size=len(tokenizer), hidden_size=width, num_hidden_layers=layers,
                  **shape).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return ["demo_teacher", "demo_student", "demo.txt"]


if __name__ == "__main__":
    main(*(sys.argv[1:] or make_demo()))
