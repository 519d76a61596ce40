"""Teachers / contexts of a gradient alignment run (`AlignmentConfig.teachers`), each 'MODEL' or 'MODEL+VIEW'.

MODEL is 'teacher' (the model at teacher.path) or 'self' (the student itself, frozen, as a self-teacher); VIEW is
'none' (the student's prompt, the default), 'full' / 'partial' (the prompt with the whole oracle trace / its first
`privileged.rho` plus the answer line, built by `opdlab.teacher.views`) or 'summary' (the same template with only
the trace's final-answer line: a summary of the solution [R]: the summariser is not specified, so the summary is the
result alone). Signals that score both views themselves (the AR-OPD objectives, `TeacherRequest.both_views`) use
the spec's MODEL under the full and partial views; the spec's VIEW does not apply to them.

    spec = parse_spec("self+full")                 # TeacherSpec(name='self+full', model='self', view='full')
    ids_B_P, mask_B_P = spec_prompt_ids(tokenizer, rollouts, spec, cfg.privileged)

[R] marks a reconstruction: a detail the source paper's text leaves open, chosen here and explained in
docs/methods.md#reconstructions.
"""
from __future__ import annotations

from dataclasses import dataclass

from opdlab.config import PrivilegedConfig
from opdlab.models.prompts import encode_prompts, render_prompt
from opdlab.teacher.views import split_trace, view_prompt_ids

MODELS = ("teacher", "self")
SPEC_VIEWS = ("none", "full", "partial", "summary")


@dataclass(frozen=True)
class TeacherSpec:
    """One teacher / context: which model scores, under which view of the question."""

    name: str
    model: str  # 'teacher' | 'self'
    view: str  # 'none' | 'full' | 'partial' | 'summary'


def parse_spec(text: str) -> TeacherSpec:
    model, _, view = text.partition("+")
    view = view or "none"
    if model not in MODELS or view not in SPEC_VIEWS:
        raise ValueError(f"teacher spec {text!r}: expected MODEL or MODEL+VIEW with MODEL in {{{', '.join(MODELS)}}} "
                         f"and VIEW in {{{', '.join(SPEC_VIEWS)}}}, e.g. 'teacher' or 'self+full'")
    return TeacherSpec(text, model, view)


def spec_prompt_ids(tokenizer, rollouts, spec: TeacherSpec, cfg: PrivilegedConfig):
    """(ids_B_P, mask_B_P) of the teacher's prompts under the spec's view."""
    if spec.view != "summary":
        return view_prompt_ids(tokenizer, rollouts, spec.view, cfg)
    texts = []
    for p in rollouts.problems:
        answer_line = split_trace(p.solution)[1] if p.solution else ""
        texts.append(render_prompt(tokenizer, cfg.template.format(question=p.question,
                                                                  trace=answer_line or f"Answer: {p.answer}")))
    ids, mask = encode_prompts(tokenizer, texts)
    return ids.to(rollouts.prompt_ids_B_P.device), mask.to(rollouts.prompt_ids_B_P.device)
