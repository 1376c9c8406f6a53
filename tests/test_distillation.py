"""Distillation from a teacher's logits (model.distill_from): the loss, the positions it reads, a student that
learns its teacher, the teacher kept out of checkpoints, and the one-line errors."""

import torch
import torch.nn.functional as F

from recurrent_lm import RecurrentConfig, RecurrentLM
from recurrent_lm.train.distillation import distillation_loss, distilled_positions
from recurrent_lm.train.module import RecurrentLMModule

from .test_retrofit import tiny_source
from .test_train import logged, train

VOCAB = 48  # configs/debug.yaml's vocabulary


def tiny_teacher(path, vocab_size: int = VOCAB, seed: int = 3):
    torch.manual_seed(seed)
    RecurrentLM(RecurrentConfig.preset("debug", vocab_size=vocab_size)).save_pretrained(path)
    return path


def test_the_loss_is_the_softened_kl_times_t_squared():
    generator = torch.Generator().manual_seed(0)
    student, teacher = (torch.randn(2, 5, 7, generator=generator) for _ in range(2))
    positions = torch.tensor([[0, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    assert distillation_loss(teacher, teacher, positions, 2.0) == 0
    for t in (1.0, 2.0):
        p_teacher = F.softmax(teacher[positions] / t, -1)
        expected = (p_teacher * (p_teacher.log() - F.log_softmax(student[positions] / t, -1))).sum(-1).mean() * t * t
        torch.testing.assert_close(distillation_loss(student, teacher, positions, t), expected)
    # positions left out do not count
    changed = student.clone()
    changed[0, 0] += 5
    assert distillation_loss(changed, teacher, positions, 1.0) == distillation_loss(student, teacher, positions, 1.0)
    assert distillation_loss(student, teacher, torch.zeros_like(positions), 1.0) == 0  # nothing to distil: 0, not NaN


def test_positions_are_the_answers_or_every_real_next_token():
    labels = torch.tensor([[-100, -100, -100, 5, 6], [-100, -100, 7, 8, 9]])
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    # position t predicts token t + 1: the answers' predictors; every position whose next token is real
    assert distilled_positions(labels, mask, "labels").int().tolist() == [[0, 0, 1, 1, 0], [0, 1, 1, 1, 0]]
    assert distilled_positions(labels, mask, "all").int().tolist() == [[0, 1, 1, 1, 0], [1, 1, 1, 1, 0]]


def test_the_step_loss_mixes_ce_and_kl_and_the_teacher_stays_out_of_the_module(tmp_path):
    teacher_dir = tiny_teacher(tmp_path / "teacher")
    module = RecurrentLMModule({"preset": "debug", "vocab_size": VOCAB}, distill_from=str(teacher_dir),
                               distill_weight=0.25, distill_temperature=2.0, distill_on="all")
    assert module.teacher.num_steps == module.teacher.model.config.mean_recurrence
    assert not any(p is q for p in module.parameters() for q in module.teacher.model.parameters())
    assert all(key.startswith("model.") for key in module.state_dict())  # nothing of the teacher is checkpointed
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :4] = -100
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    teacher_logits = module.teacher.logits(ids, mask)
    expected_teacher = module.teacher.model(ids, num_steps=module.teacher.num_steps, init_scale=0.0).logits
    torch.testing.assert_close(teacher_logits, expected_teacher)
    module.log_dict = lambda *args, **kwargs: None  # outside a Trainer
    out = module.model(ids, attention_mask=mask, labels=labels, num_steps=2, init_scale=0.0)
    kl = distillation_loss(out.logits, teacher_logits, distilled_positions(labels, mask, "all"), 2.0)
    torch.testing.assert_close(module.distilled(out, batch, teacher_logits), 0.75 * out.loss + 0.25 * kl)
    assert module.distilled(out, batch, None) is out.loss


def test_a_student_learns_its_teachers_distributions(tmp_path):
    """Distillation alone (weight 1) pulls a debug model's predictions toward a fixed teacher's: the KL falls, and
    the run's checkpoint holds the student alone."""
    teacher_dir = tiny_teacher(tmp_path / "teacher")
    root = train(tmp_path, "--trainer.max_steps", "40", "--trainer.limit_val_batches", "0",
                 "--trainer.log_every_n_steps", "1", "--model.distill_from", str(teacher_dir),
                 "--model.distill_weight", "1", "--model.distill_on", "all", "--model.distill_depth", "2")
    kl = [value for _, value in logged(root, "train/kl")]
    assert len(kl) >= 30 and sum(kl[-5:]) < 0.5 * sum(kl[:5]), kl
    checkpoint = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(key.startswith("model.") for key in checkpoint["state_dict"])
    assert checkpoint["hyper_parameters"]["distill_from"] == str(teacher_dir)


def test_a_transformers_teacher_gives_its_logits(tmp_path):
    source = tiny_source(tmp_path / "llama", "llama", vocab_size=40)
    module = RecurrentLMModule({"preset": "debug", "vocab_size": 40}, distill_from=str(tmp_path / "llama"))
    ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        expected = source(ids, attention_mask=mask).logits
    torch.testing.assert_close(module.teacher.logits(ids, mask), expected)


def test_what_cannot_be_distilled_is_a_one_line_error(tmp_path):
    from .test_cli import one_line_error
    from .test_train import quick_train

    teacher = str(tiny_teacher(tmp_path / "teacher", vocab_size=40))
    tiny_source(tmp_path / "llama", "llama", vocab_size=VOCAB)
    run = ["--trainer.default_root_dir", str(tmp_path / "run")]
    for args, message in [
        (["--model.distill_from", teacher], "its vocabulary has 40 tokens, the student's 48; a teacher must share"),
        (["--model.distill_depth", "2"], "model.distill_depth is a teacher's depth: set model.distill_from"),
        (["--model.distill_from", str(tmp_path / "llama"), "--model.distill_depth", "2"],
         "model.distill_depth sets a recurrent teacher's depth: " + str(tmp_path / "llama") + " is a 'llama' model"),
        (["--model.distill_from", str(tmp_path / "missing")], "missing is not a model directory"),
        (["--model.distill_from", teacher, "--model.distill_weight", "0"], "model.distill_weight must be in (0, 1]"),
        (["--model.distill_from", teacher, "--model.distill_temperature", "0"],
         "model.distill_temperature must be > 0"),
    ]:
        one_line_error(quick_train(*run, *args), message)
    assert not (tmp_path / "run" / "checkpoints").exists()
