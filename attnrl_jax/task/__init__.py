"""The built-in reasoning task: arithmetic chains solved in "\\n\\n"-separated steps (`arith`), a small BPE
tokenizer trained on them (`tokenizer`), a supervised warm start of a tiny Qwen2 (`warm_start`) and the
end-to-end job that trains it with AttnRL, evaluates it and writes the report (`pipeline`)."""
