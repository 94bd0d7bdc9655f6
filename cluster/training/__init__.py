"""Exit-head training and threshold calibration (``eeserve train-exits``, ``eeserve calibrate``).

Modules: ``data`` (prompt sets, splits, cached greedy answers), ``features`` (hidden states from a
full-sequence forward of our model), ``train`` (self-distilled heads, exit classifiers),
``evaluate`` (teacher-forced exit statistics through :class:`cluster.model.exits.ExitHeads`),
``calibrate`` (threshold search), ``pipeline`` (the two commands end to end), ``cli`` (argparse).
"""
