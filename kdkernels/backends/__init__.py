"""Backends of the fused KD row loss.

Every backend offers one entry point with the same contract, ``rows(...)``:

    rows(student_logits [N, V], teacher_logits [N, V], labels [N] or None,
         grad_scale: 0-dim float32 tensor, cfg: KDConfig, compute_grad: bool)
        -> (row_loss [N] float32 (float64 for float64 input), grad [N, V] in the student dtype or None)

``grad`` is dL/d(student_logits) of ``grad_scale * row_loss.sum()``. Rows whose label equals
``cfg.ignore_index`` have loss 0 and gradient 0. Arguments arrive validated (kdkernels._checks);
``CHECKS_VALUES`` says whether the backend detects NaN/+inf teachers and out-of-range labels
itself while streaming (otherwise the caller checks first); ``BAD_INPUT_AS_NAN`` (GPU backends)
says it reports them as NaN row losses, which kdkernels._dispatch.rows_fn turns into ValueError.

A backend may also offer ``rows_inplace(student_logits, teacher_logits, labels, grad_scale, cfg)
-> row_loss``: the same, with the gradient written over ``student_logits`` (contiguous), for
callers that own a reusable logits buffer (kdkernels.fused_linear); it saves the [N, V]
allocation and its first-touch page faults.
"""
