"""The built-in reasoning tasks: two families of problems solved in "\\n\\n"-separated steps (`arith`:
arithmetic chains of 2-6 steps; `program`: programs of named values, 8-10 steps with pivotal steps), a small
BPE tokenizer trained on them (`tokenizer`), a supervised warm start of a tiny Qwen2 (`warm_start`) and the
end-to-end job that trains it with AttnRL, evaluates it and writes the report (`pipeline`)."""

from attnrl_jax.task import arith, program

FAMILIES = {"arith": arith, "program": program}  # config.task.family -> generator module


def family(name: str):
    """The generator module of a task family (`make_split`, `LEVELS`; data_source "<name>_l<level>")."""
    if name not in FAMILIES:
        raise ValueError(
            f"config.task.family={name!r}: unknown task family; expected one of {sorted(FAMILIES)}"
        )
    return FAMILIES[name]
