"""Pure math: tensors and arrays in, tensors and arrays out; no config, no paths, no I/O.

``losses`` (distillation), ``metrics`` (accuracy, NLL, ECE, significance), ``covariance``,
``kmeans`` and ``subsets`` (confusable-class discovery), ``heads`` (a specialist's head,
collapse, dustbin, phases), ``combine`` (routing and the KL-minimizing combination),
``scoring`` (the evaluation's comparison, Table 4, the ablation's order), ``optim``
(optimizer and learning-rate schedule), ``checks`` (argument validation).
"""
