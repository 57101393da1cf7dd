"""Pure math: tensors and arrays in, tensors and arrays out; no config, no paths, no I/O.

``losses`` (distillation), ``metrics`` (accuracy, NLL, ECE, significance), ``covariance``,
``kmeans`` and ``subsets`` (confusable-class discovery), ``heads`` (a specialist's head,
collapse, dustbin, phases), ``combine`` (routing and the KL-minimizing combination; its
torch-free twin ``combine_numpy``, which owns the constants both share, and the slow
``combine_reference``), ``scoring`` (the evaluation's comparison, Table 4, the ablation's
order), ``optim`` (optimizer and learning-rate schedule), ``checks`` (argument validation),
``tokens`` (the padding id of token-id rows), ``layout`` (the one NHWC/NCHW rule and the raw
input batch, numpy only).

One exception to "no I/O": ``digest`` (a file's sha256), here because it is the lowest layer
that both the run directory and the torch-free ONNX runtime may import.
"""
