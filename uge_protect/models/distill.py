"""Knowledge distillation: the loss of a student taught by a teacher's softened outputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0
                 ) -> torch.Tensor:
    """KL(teacher ‖ student) on temperature-softened outputs, times T² (Hinton et al. 2015)."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits.detach() / t, dim=1),
                    log_target=True, reduction="batchmean") * t * t
