"""Attacks as generation requests: the `Attack` base class (base.py) and one module per built-in type.

An attack is a registered type (`register_attack`) with a settings dataclass; the config selects named
instances of types (`attack.<name>`, the type defaulting to the name). Each instance turns into variants,
one setting applied to every evaluation item. Every generation is keyed `<variant>/<prompt id>/<sample>`,
where the variant is the instance name, alone (`none`, `gcg`, `template`) or with its setting
(`prefill/k=10`, `prefill/str=0`, `decoding/temperature=0.5`, `decoding/top_k=5`, `decoding/top_p=0.9`,
`decoding/greedy`); judgments and metrics are grouped by the same variants. Built-ins: none.py, prefill.py,
decoding.py, gcg.py, template.py; the evaluation set and `Variant` are in deepalign/eval_items.py.
"""

# the built-in types, registered in the order `deepalign --help` lists them
from deepalign.attacks import none, prefill, decoding, gcg, template  # noqa: F401,I001

# installed plugins import these from here
from deepalign.attacks.base import Attack, AttackRun
from deepalign.eval_items import Variant

__all__ = ["Attack", "AttackRun", "Variant"]
