"""The `utility` stage: does the model stay useful? Over-refusal on benign prompts, task scores, lm-eval.

Metrics: `utility/benign/over_refusal` (share of benign prompts answered with a refusal phrase, keyword
lists `qi2024`), `utility/<task>/rouge1` (SAMSum, SQL; ROUGE-1 F in [0, 1]), `utility/<task>/accuracy`
(GSM8k exact match after "####"), `utility/lm_eval/<task>/<metric>` (optional, lm-eval-harness).
Generations go to `generations/utility_<name>.jsonl` and are reused on a re-run.
"""

from __future__ import annotations

import logging

from deepalign.config import DataComponent, DeepAlignConfig, UtilityConfig, check, check_local_source
from deepalign.context import RunContext
from deepalign.data import read_component, read_rows, task_chat
from deepalign.eval_items import EvalItem, Variant
from deepalign.generation import SamplingParams, make_engine
from deepalign.generation_store import generate_variant, throughput
from deepalign.judges import JudgeItem, KeywordJudgeConfig
from deepalign.judges import KeywordJudge as KeywordRefusal
from deepalign.plugins import register_stage
from deepalign.storage.jsonl import JsonlStore
from deepalign.utility import gsm8k_accuracy, rouge1_f

log = logging.getLogger(__name__)


def _responses(ctx, engine, name: str, prompts: list[str], params: SamplingParams) -> list[str]:
    """Greedy answers to `prompts`, generated once and kept in generations/utility_<name>.jsonl."""
    store = JsonlStore(ctx.run_dir / "generations" / f"utility_{name}.jsonl")
    items = [EvalItem(id=str(i), prompt=p, request=p) for i, p in enumerate(prompts)]
    variant = Variant(f"utility/{name}", params)
    generate_variant(
        engine,
        store,
        variant,
        items,
        ctx.model().tokenizer,
        system=ctx.config.data.system_prompt,
        seed=ctx.config.seed,
        model_id=ctx.model_id(),
    )
    return [store.records[f"{variant.name}/{i}/0"]["response"] for i in range(len(prompts))]


def lm_eval_metrics(loaded, tasks: list[str]) -> dict[str, float]:
    """lm-eval-harness tasks through its Python API on the loaded model (needs `pip install lm-eval`)."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:
        raise ImportError("utility.lm_eval_tasks needs lm-eval-harness: pip install lm-eval") from err
    results = simple_evaluate(
        model=HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer), tasks=list(tasks)
    )
    out = {}
    for task, values in results["results"].items():
        for metric, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"utility/lm_eval/{task}/{metric.replace(',', '/')}"] = float(value)
    return out


def check_utility(config: DeepAlignConfig) -> None:
    """What the stage needs of the config: something to measure, and the local files it names."""
    u = config.utility
    check(
        bool(u.benign or u.tasks or u.lm_eval_tasks),
        "utility",
        "the utility stage needs utility.benign, utility.tasks or utility.lm_eval_tasks",
    )
    check_local_source("utility.benign", u.benign)
    for name, task in u.tasks.items():
        check(
            task.schema in ("samsum", "sql", "gsm8k"),
            f"utility.tasks.{name}.schema",
            f"{task.schema!r} is not one of samsum, sql, gsm8k",
        )
        check_local_source(f"utility.tasks.{name}.source", task.source)


@register_stage(
    "utility",
    sections=("model", "utility", "generation", "data.system_prompt", "seed"),
    config=UtilityConfig,
    check=check_utility,
)
def run_utility(ctx: RunContext) -> dict[str, float]:
    u = ctx.config.utility
    loaded = ctx.model()
    engine = make_engine(ctx.config.generation, loaded, model_path=ctx.model_path())
    params = SamplingParams(do_sample=False, max_new_tokens=u.max_new_tokens)
    metrics: dict[str, float] = {}
    if u.benign:
        rows = read_rows(u.benign, "utility.benign", limit=u.benign_limit)
        prompts = [row.get("prompt") or row.get("instruction") for _, row in rows]
        if not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ValueError(
                f"utility.benign: every row of {u.benign} needs a `prompt` (or `instruction`) field"
            )
        answers = _responses(ctx, engine, "benign", prompts, params)
        judge = KeywordRefusal("keyword", KeywordJudgeConfig(lists=["qi2024"]))
        verdicts = judge.judge(
            [JudgeItem(id=str(i), prompt=p, response=a) for i, (p, a) in enumerate(zip(prompts, answers))]
        )
        metrics["utility/benign/over_refusal"] = round(
            sum(not v.harmful for v in verdicts) / len(verdicts), 4
        )
    for name, task in u.tasks.items():
        comp = DataComponent(
            source=task.source,
            schema=task.schema,
            split=task.split,
            subset=task.subset,
            columns=dict(task.columns),
            limit=task.limit,
        )
        pairs = [task_chat(task.schema, row) for row in read_component(comp, f"utility.tasks.{name}")]
        answers = _responses(ctx, engine, name, [p for p, _ in pairs], params)
        references = [r for _, r in pairs]
        if task.schema == "gsm8k":
            metrics[f"utility/{name}/accuracy"] = round(gsm8k_accuracy(answers, references), 4)
        else:
            metrics[f"utility/{name}/rouge1"] = round(rouge1_f(answers, references), 4)
    metrics.update(throughput(engine, "utility"))
    if u.lm_eval_tasks:
        metrics.update(lm_eval_metrics(loaded, list(u.lm_eval_tasks)))
    return metrics
