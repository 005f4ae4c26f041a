"""The study report: ``report.md`` and its PNG figures, built only from a run directory's own outputs.

Run directory layout (written by ``medrl reproduce``; every part is optional, missing parts are reported
as not run):

```
RUN/plan.json                       the study plan (scale, flags, models, hyperparameters)
RUN/runcard.json                    versions, hardware, code revision, seeds, data hashes
RUN/stages.json                     per-stage status and wall time
RUN/vision/results.csv              the probe table (``medrl probe-table``)
RUN/eval/<model>/<flag>/summary.json  Acc@1 / Pass@k of model <model> on <flag> (``medrl validate``)
RUN/recipe/<flag>/recipe.json       the recipe's measurements and decisions
```

Model labels: ``base`` (untrained), ``sft_<flag>`` (SFT on <flag>), ``rl_base_<flag>`` (GRPO from base),
``rl_sft_<flag>`` (GRPO from the SFT model).
"""

from medrl.report.build import build_report

__all__ = ["build_report"]
