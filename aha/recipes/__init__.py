"""Recipes: the end-to-end jobs that compose aha's components (torchtune's recipes/ split).

* :mod:`~aha.recipes.finetune` -- ``aha train``: fine-tune a model to route (:func:`~aha.recipes.finetune.train`);
* :mod:`~aha.recipes.sweep` -- ``aha sweep``: one fine-tune per window, the long-tail curve;
* :mod:`~aha.recipes.demo` -- ``aha demo``: from a pretrained model to a routed one and its report.

Recipes import the optional packages of the ``train`` / ``eval`` / ``cli`` extras; the library
(:mod:`aha`, :mod:`aha.hf`, :mod:`aha.kernels`) does not. Nothing is imported here, so importing one
recipe does not pull in the others.
"""
