"""The three stages as runnable units: config in, run directory out.

``pretrain`` (reprlab.ssl methods), ``finetune`` (reprlab.finetune policies) and ``evaluate`` (reprlab.evaluate
metrics) each read a typed config, build data, encoder and task from it, and hand the task to ``engine.fit``.
The methods, policies and metrics themselves know nothing of configs or run directories.
"""
