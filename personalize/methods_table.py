"""Human-readable stage tables of methods (`personalize methods`)."""

from __future__ import annotations

from personalize.method_spec import MethodSpec


def _losses(stage) -> str:
    parts = []
    for term, spec in stage.losses.items():
        extra = ", ".join(f"{k}={v}" for k, v in spec.params.items())
        parts.append(f"{term}x{spec.weight:g}" + (f"({extra})" if extra else ""))
    return " + ".join(parts)


def method_table(method: MethodSpec) -> str:
    rows = [("stage", "trainable", "steps", "lr", "batch", "losses")]
    stages = list(method.stages) + ([method.test_time] if method.test_time else [])
    for stage in stages:
        label = stage.name + (" (test-time)" if stage is method.test_time else "")
        extras = []
        if stage.use_class_prior:
            extras.append("class prior")
        if stage.embedding_norm_lock:
            start, end = stage.embedding_norm_lock.window(stage.steps)
            extras.append(f"norm lock {start}-{end}")
        batch = f"{stage.batch_size}" + (f"x{stage.grad_accum}" if stage.grad_accum > 1 else "")
        steps = f"{stage.steps}" + (f" (x{stage.model_steps_scale:g})" if stage.model_steps_scale != 1.0 else "")
        lr = f"{stage.lr:g}" + (f" (x{stage.model_lr_scale:g})" if stage.model_lr_scale != 1.0 else "")
        lora = set(stage.lora_targets)
        trainable = [f"{t} (LoRA r{stage.lora.rank}, alpha {stage.lora.scale_alpha:g})" if t in lora else t for t in stage.trainable]
        rows.append((label, ", ".join(trainable), steps, lr, batch,
                     _losses(stage) + (f" [{'; '.join(extras)}]" if extras else "")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"{method.name} -- {method.paper}", f"  {method.summary}"]
    for i, row in enumerate(rows):
        lines.append("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if i == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    return "\n".join(lines)
